"""SCRAM server side (RFC 5802, RFC 7677): SCRAM-SHA-256 and SCRAM-SHA-512, as Kafka brokers
speak it. Pure: no I/O, no clock, no randomness inside; the caller passes the server nonce and
the credential lookup.

A credential is what a server stores per user: salt, iteration count, StoredKey and ServerKey,
never the password. StoredKey lets the server check a client's proof; ServerKey lets it prove
itself to the client; neither lets anyone log in as the user."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512"]
MECHANISMS: tuple[Mechanism, ...] = ("SCRAM-SHA-512", "SCRAM-SHA-256")
_HASH = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
# Kafka's own floor for SCRAM credentials; fewer makes an offline guess of a stolen file cheaper.
MIN_ITERATIONS = 4096


class ScramError(ValueError):
    """The exchange failed; the message says why (for the server's log, not for the client:
    the client gets one generic refusal so it cannot tell a wrong password from an unknown user)."""


@dataclass(frozen=True)
class ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def to_json(self) -> dict[str, str | int]:
        b64 = base64.b64encode
        return {
            "salt": b64(self.salt).decode(),
            "iterations": self.iterations,
            "stored_key": b64(self.stored_key).decode(),
            "server_key": b64(self.server_key).decode(),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> ScramCredential:
        def raw(name: str) -> bytes:
            return base64.b64decode(str(doc[name]), validate=True)

        iterations = doc["iterations"]
        if not isinstance(iterations, int) or iterations < MIN_ITERATIONS:
            raise ValueError(f"iterations must be an int >= {MIN_ITERATIONS}, got {iterations!r}")
        return cls(raw("salt"), iterations, raw("stored_key"), raw("server_key"))


def _hmac(mech: Mechanism, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, _HASH[mech]).digest()


def _h(mech: Mechanism, data: bytes) -> bytes:
    return hashlib.new(_HASH[mech], data).digest()


def make_credential(
    password: str, mechanism: Mechanism, salt: bytes, iterations: int = MIN_ITERATIONS
) -> ScramCredential:
    """The stored form of `password` (RFC 5802 section 3). The caller picks the salt (random,
    16 bytes or more) so this stays pure and testable."""
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"iterations must be >= {MIN_ITERATIONS}")
    salted = hashlib.pbkdf2_hmac(_HASH[mechanism], password.encode(), salt, iterations)
    client_key = _hmac(mechanism, salted, b"Client Key")
    return ScramCredential(salt, iterations, _h(mechanism, client_key), _hmac(mechanism, salted, b"Server Key"))


# ------------------------------------------------------------------ users file
# {"users": {"<name>": {"SCRAM-SHA-512": {salt, iterations, stored_key, server_key}, ...}}}
Users = dict[str, dict[Mechanism, ScramCredential]]


def users_doc(users: Users) -> dict[str, object]:
    return {"users": {u: {m: c.to_json() for m, c in creds.items()} for u, creds in users.items()}}


def parse_users(doc: Mapping[str, object]) -> Users:
    body = doc.get("users")
    if not isinstance(body, dict):
        raise ValueError('a users file is {"users": {name: {mechanism: credential}}}')
    out: Users = {}
    for user, creds in body.items():
        if not isinstance(creds, dict):
            raise ValueError(f"user {user!r}: expected {{mechanism: credential}}")
        entry: dict[Mechanism, ScramCredential] = {}
        for mech, cred in creds.items():
            if mech not in MECHANISMS or not isinstance(cred, dict):
                raise ValueError(f"user {user!r}: unknown mechanism {mech!r}")
            entry[mech] = ScramCredential.from_json(cred)
        out[str(user)] = entry
    return out


def write_users_file(path: str | Path, passwords: Mapping[str, str], iterations: int = MIN_ITERATIONS) -> Path:
    """A users file holding SCRAM-SHA-512 and -256 credentials for each (user, password), with
    fresh random salts; readable by its owner only."""
    import secrets

    users: Users = {
        u: {m: make_credential(pw, m, secrets.token_bytes(24), iterations) for m in MECHANISMS}
        for u, pw in passwords.items()
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch(mode=0o600)
    p.write_text(json.dumps(users_doc(users), indent=1))
    return p


def load_users_file(path: str | Path) -> Users:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object")
    return parse_users(doc)


# ------------------------------------------------------------------ the exchange
def _attrs(msg: str) -> list[tuple[str, str]]:
    out = []
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


def _saslname(name: str) -> str:
    """RFC 5802 5.1: ',' and '=' travel as '=2C' and '=3D'; any other '=' is malformed."""
    rest = name.replace("=2C", "").replace("=3D", "")
    if "=" in rest or "," in rest:
        raise ScramError("malformed user name")
    return name.replace("=2C", ",").replace("=3D", "=")


@dataclass
class ScramServer:
    """One server-side exchange: client-first -> server-first, client-final -> server-final.
    `lookup(user)` returns the user's stored credential or None. An unknown user still gets a
    server-first message (from a decoy credential made from the nonce), so the refusal comes at
    the proof, alike for a wrong password and an unknown user (RFC 5802 section 9)."""

    mechanism: Mechanism
    lookup: Callable[[str], ScramCredential | None]
    server_nonce: str
    user: str = ""
    _cred: ScramCredential | None = None
    _known: bool = False
    _gs2: str = ""
    _nonce: str = ""
    _first_bare: str = ""
    _server_first: str = ""
    done: bool = False

    def first(self, client_first: bytes) -> bytes:
        if self._server_first:
            raise ScramError("client-first sent twice")
        if not self.server_nonce or "," in self.server_nonce:
            raise ScramError("bad server nonce")
        try:
            text = client_first.decode()
        except UnicodeDecodeError as exc:
            raise ScramError("client-first is not UTF-8") from exc
        # gs2-header: channel-binding flag, optional authzid, then the bare message
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed client-first")
        cbind, authzid, bare = parts
        if cbind not in ("n", "y"):
            raise ScramError("channel binding is not supported")
        attrs = _attrs(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise ScramError("client-first must start with n=<user>,r=<nonce>")
        if any(k == "m" for k, _ in attrs):
            raise ScramError("mandatory extension not supported")
        self.user = _saslname(attrs[0][1])
        if authzid and authzid != f"a={attrs[0][1]}":
            # Kafka's rule: acting for another principal is not allowed
            raise ScramError("authorization id differs from the user")
        self._nonce = attrs[1][1]
        if not self._nonce:
            raise ScramError("empty client nonce")
        cred = self.lookup(self.user)
        self._known = cred is not None
        # the decoy's salt depends on the name only, so asking twice about one unknown user
        # shows the same salt, as for a real one
        decoy_salt = _h(self.mechanism, b"decoy:" + self.user.encode())[:24]
        self._cred = cred or make_credential(self.server_nonce, self.mechanism, decoy_salt)
        self._gs2 = f"{cbind},{authzid},"
        self._first_bare = bare
        salt = base64.b64encode(self._cred.salt).decode()
        self._server_first = f"r={self._nonce}{self.server_nonce},s={salt},i={self._cred.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        if not self._server_first or self._cred is None:
            raise ScramError("client-final before client-first")
        if self.done:
            raise ScramError("exchange already finished")
        try:
            text = client_final.decode()
        except UnicodeDecodeError as exc:
            raise ScramError("client-final is not UTF-8") from exc
        head, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final without proof")
        attrs = dict(_attrs(head))
        expected_cb = base64.b64encode(self._gs2.encode()).decode()
        if attrs.get("c") != expected_cb:
            raise ScramError("channel-binding data does not match the gs2 header")
        if not hmac.compare_digest(attrs.get("r", "").encode(), f"{self._nonce}{self.server_nonce}".encode()):
            raise ScramError("nonce mismatch")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError as exc:
            raise ScramError("proof is not base64") from exc
        auth_message = f"{self._first_bare},{self._server_first},{head}".encode()
        signature = _hmac(self.mechanism, self._cred.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("wrong proof length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        ok = hmac.compare_digest(_h(self.mechanism, client_key), self._cred.stored_key)
        if not (ok and self._known):
            raise ScramError("unknown user" if not self._known else "wrong proof (wrong password)")
        self.done = True
        server_sig = _hmac(self.mechanism, self._cred.server_key, auth_message)
        return f"v={base64.b64encode(server_sig).decode()}".encode()
