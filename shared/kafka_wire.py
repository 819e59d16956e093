"""The few pieces of the Kafka wire protocol the SASL gateway (shared/kafka_gateway.py) reads and
writes itself: request headers, SaslHandshake (key 17), SaslAuthenticate (key 36), and the
ApiVersions (key 18) response it checks. Pure: bytes in, bytes out.

Framing: every request and response is a 4-byte big-endian length, then the message. A request
header is api_key int16, api_version int16, correlation_id int32, client_id nullable string
(int16 length, -1 = null), and, in a flexible version, tagged fields. A response header is the
correlation_id (plus tagged fields when flexible; never for ApiVersions)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

API_VERSIONS = 18
SASL_HANDSHAKE = 17
SASL_AUTHENTICATE = 36
# The versions the gateway answers (what tansu 0.6 and Apache Kafka 3.x advertise). Handshake v0
# would be followed by raw SASL tokens without Kafka framing: refused, every current client
# (aiokafka, librdkafka, the Java client) uses v1 + SaslAuthenticate.
HANDSHAKE_VERSIONS = (1, 1)
AUTHENTICATE_VERSIONS = (0, 2)
FLEXIBLE_FROM = {SASL_AUTHENTICATE: 2, API_VERSIONS: 3}

# error codes (Kafka protocol)
NONE = 0
UNSUPPORTED_SASL_MECHANISM = 33
ILLEGAL_SASL_STATE = 34
UNSUPPORTED_VERSION = 35
SASL_AUTHENTICATION_FAILED = 58


class WireError(ValueError):
    pass


@dataclass(frozen=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    body_at: int  # where the request body starts in the frame

    @property
    def flexible(self) -> bool:
        start = FLEXIBLE_FROM.get(self.api_key)
        return start is not None and self.api_version >= start


def _uvarint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(buf) or shift > 28:
            raise WireError("truncated or oversized varint")
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _skip_tagged(buf: bytes, at: int) -> int:
    count, at = _uvarint(buf, at)
    for _ in range(count):
        _, at = _uvarint(buf, at)  # tag
        size, at = _uvarint(buf, at)
        at += size
    if at > len(buf):
        raise WireError("truncated tagged fields")
    return at


def parse_request_header(frame: bytes) -> RequestHeader:
    if len(frame) < 10:
        raise WireError("request shorter than its header")
    api_key, api_version, correlation_id, client_len = struct.unpack_from(">hhih", frame, 0)
    at = 10 + max(client_len, 0)
    if at > len(frame):
        raise WireError("truncated client id")
    head = RequestHeader(api_key, api_version, correlation_id, at)
    if head.flexible:
        head = RequestHeader(api_key, api_version, correlation_id, _skip_tagged(frame, at))
    return head


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def _compact_string(s: str | None) -> bytes:
    if s is None:
        return uvarint(0)
    raw = s.encode()
    return uvarint(len(raw) + 1) + raw


# ------------------------------------------------------------------ SaslHandshake
def handshake_mechanism(frame_: bytes, head: RequestHeader) -> str:
    (n,) = struct.unpack_from(">h", frame_, head.body_at)
    start = head.body_at + 2
    if n < 0 or start + n > len(frame_):
        raise WireError("bad mechanism string")
    return frame_[start : start + n].decode()


def handshake_response(correlation_id: int, error: int, mechanisms: tuple[str, ...]) -> bytes:
    body = struct.pack(">ihi", correlation_id, error, len(mechanisms))
    return frame(body + b"".join(_string(m) for m in mechanisms))


# ------------------------------------------------------------------ SaslAuthenticate
def authenticate_bytes(frame_: bytes, head: RequestHeader) -> bytes:
    at = head.body_at
    if head.flexible:
        n, at = _uvarint(frame_, at)
        n -= 1
    else:
        (n,) = struct.unpack_from(">i", frame_, at)
        at += 4
    if n < 0 or at + n > len(frame_):
        raise WireError("bad sasl_auth_bytes")
    return frame_[at : at + n]


def authenticate_response(
    head: RequestHeader, error: int, message: str | None, auth_bytes: bytes, session_lifetime_ms: int = 0
) -> bytes:
    """SaslAuthenticate response in the request's version (0, 1 or flexible 2)."""
    if head.flexible:
        body = (
            struct.pack(">i", head.correlation_id)
            + b"\x00"  # response header tagged fields
            + struct.pack(">h", error)
            + _compact_string(message)
            + uvarint(len(auth_bytes) + 1)
            + auth_bytes
            + struct.pack(">q", session_lifetime_ms)
            + b"\x00"
        )
        return frame(body)
    body = struct.pack(">ih", head.correlation_id, error) + _string(message) + struct.pack(">i", len(auth_bytes))
    body += auth_bytes
    if head.api_version >= 1:
        body += struct.pack(">q", session_lifetime_ms)
    return frame(body)


# ------------------------------------------------------------------ ApiVersions
def api_versions(payload: bytes, version: int) -> dict[int, tuple[int, int]]:
    """api_key -> (min, max) from an ApiVersions response (its header included: correlation id
    only, also in flexible versions)."""
    return _api_versions(payload, version)[0]


def _api_versions(payload: bytes, version: int) -> tuple[dict[int, tuple[int, int]], int, int]:
    """-> (versions, where the array's count starts, where the array ends)."""
    at = 6  # correlation id, error code
    count_at = at
    out: dict[int, tuple[int, int]] = {}
    if version >= FLEXIBLE_FROM[API_VERSIONS]:
        n, at = _uvarint(payload, at)
        n -= 1
    else:
        (n,) = struct.unpack_from(">i", payload, at)
        at += 4
    for _ in range(max(n, 0)):
        if at + 6 > len(payload):
            raise WireError("truncated ApiVersions response")
        key, lo, hi = struct.unpack_from(">hhh", payload, at)
        at += 6
        if version >= FLEXIBLE_FROM[API_VERSIONS]:
            at = _skip_tagged(payload, at)
        out[key] = (lo, hi)
    return out, count_at, at


def with_sasl_apis(payload: bytes, version: int) -> bytes:
    """The ApiVersions response (without its length prefix), with SaslHandshake and
    SaslAuthenticate added if the broker behind the gateway does not list them: the gateway
    answers those itself, and a client only uses an API the list names."""
    versions, count_at, end = _api_versions(payload, version)
    missing = [
        (k, lo, hi)
        for k, (lo, hi) in ((SASL_HANDSHAKE, HANDSHAKE_VERSIONS), (SASL_AUTHENTICATE, AUTHENTICATE_VERSIONS))
        if k not in versions
    ]
    if not missing:
        return payload
    flexible = version >= FLEXIBLE_FROM[API_VERSIONS]
    n = len(versions) + len(missing)
    count = uvarint(n + 1) if flexible else struct.pack(">i", n)
    _, first = _uvarint(payload, count_at) if flexible else (0, count_at + 4)
    extra = b"".join(struct.pack(">hhh", *m) + (b"\x00" if flexible else b"") for m in missing)
    return payload[:count_at] + count + payload[first:end] + extra + payload[end:]
