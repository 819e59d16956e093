"""The gateway's own Kafka wire pieces (shared/kafka_wire.py): what it answers is what aiokafka's
decoders read, and the ApiVersions rewrite keeps a list that names the SASL APIs as it is and
adds them to one that does not, in the plain and the flexible encoding."""

from __future__ import annotations

import io
import struct

import pytest
from aiokafka.protocol.admin import (
    SaslAuthenticateRequest_v1,
    SaslAuthenticateResponse_v0,
    SaslAuthenticateResponse_v1,
    SaslHandShakeRequest_v1,
    SaslHandShakeResponse_v1,
)

from flashrecovery.shared import kafka_wire as W

pytestmark = pytest.mark.timeout(30)


def _request(struct_obj, correlation_id: int = 7) -> bytes:
    header = struct_obj.build_request_header(correlation_id=correlation_id, client_id="cli")
    return header.encode() + struct_obj.encode()


def test_handshake_request_and_response_as_aiokafka_reads_them():
    frame = _request(SaslHandShakeRequest_v1("SCRAM-SHA-512"))
    head = W.parse_request_header(frame)
    assert (head.api_key, head.api_version, head.correlation_id) == (17, 1, 7)
    assert W.handshake_mechanism(frame, head) == "SCRAM-SHA-512"
    reply = W.handshake_response(7, W.NONE, ("SCRAM-SHA-512", "SCRAM-SHA-256"))
    body = io.BytesIO(reply[4:])
    assert struct.unpack(">i", body.read(4))[0] == 7
    decoded = SaslHandShakeResponse_v1.decode(body)
    assert decoded.error_code == 0 and decoded.enabled_mechanisms == ["SCRAM-SHA-512", "SCRAM-SHA-256"]


@pytest.mark.parametrize("version, response", [(0, SaslAuthenticateResponse_v0), (1, SaslAuthenticateResponse_v1)])
def test_authenticate_round_trip_as_aiokafka_reads_it(version, response):
    frame = _request(SaslAuthenticateRequest_v1(b"n,,n=u,r=abc"))
    head = W.parse_request_header(frame)
    assert W.authenticate_bytes(frame, head) == b"n,,n=u,r=abc"
    head = W.RequestHeader(head.api_key, version, head.correlation_id, head.body_at)
    reply = W.authenticate_response(head, W.SASL_AUTHENTICATION_FAILED, "refused", b"xyz")
    body = io.BytesIO(reply[4:])
    assert struct.unpack(">i", body.read(4))[0] == 7
    decoded = response.decode(body)
    assert (decoded.error_code, decoded.error_message, decoded.sasl_auth_bytes) == (58, "refused", b"xyz")


def test_flexible_authenticate_v2():
    # header v2: key, version, correlation id, client id, no tagged fields; body: compact bytes
    frame = struct.pack(">hhih", 36, 2, 9, 3) + b"cli" + b"\x00" + W.uvarint(4) + b"tok" + b"\x00"
    head = W.parse_request_header(frame)
    assert head.flexible and W.authenticate_bytes(frame, head) == b"tok"
    reply = W.authenticate_response(head, W.NONE, None, b"v=sig")[4:]
    assert reply[:4] == struct.pack(">i", 9) and reply[4] == 0  # correlation id, no header tags
    assert reply[5:7] == b"\x00\x00" and reply[7] == 0  # error 0, null message
    assert reply[8] == 6 and reply[9:14] == b"v=sig"


def _api_versions_v3(entries: list[tuple[int, int, int]]) -> bytes:
    body = struct.pack(">ih", 1, 0) + W.uvarint(len(entries) + 1)
    body += b"".join(struct.pack(">hhh", *e) + b"\x00" for e in entries)
    return body + struct.pack(">i", 0) + b"\x00"


def _api_versions_v0(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack(">ihi", 1, 0, len(entries)) + b"".join(struct.pack(">hhh", *e) for e in entries)


@pytest.mark.parametrize("version, encode", [(0, _api_versions_v0), (3, _api_versions_v3)])
def test_sasl_apis_added_only_when_missing(version, encode):
    listed = encode([(0, 0, 9), (17, 0, 1), (36, 0, 2), (18, 0, 3)])
    assert W.with_sasl_apis(listed, version) == listed
    bare = encode([(0, 0, 9), (3, 0, 12), (18, 0, 3)])
    added = W.with_sasl_apis(bare, version)
    got = W.api_versions(added, version)
    assert got == {0: (0, 9), 3: (0, 12), 18: (0, 3), 17: W.HANDSHAKE_VERSIONS, 36: W.AUTHENTICATE_VERSIONS}
    assert added.endswith(bare[-5:] if version >= 3 else b"")  # what follows the array is kept
