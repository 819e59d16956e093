"""The SCRAM server core (shared/scram.py) against hand-run client exchanges: RFC 7677's
SCRAM-SHA-256 test vector, then SHA-512 with a client written here from RFC 5802, and the
refusals (wrong proof, nonce mismatch, unknown user, channel binding)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from flashrecovery.shared.scram import (
    MIN_ITERATIONS,
    ScramCredential,
    ScramError,
    ScramServer,
    load_users_file,
    make_credential,
    write_users_file,
)

pytestmark = pytest.mark.timeout(30)

# RFC 7677 section 3: user "user", password "pencil"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def _rfc_server(password: str = "pencil") -> ScramServer:
    cred = make_credential(password, "SCRAM-SHA-256", RFC_SALT, 4096)
    return ScramServer("SCRAM-SHA-256", {"user": cred}.get, RFC_SERVER_NONCE)


def test_rfc7677_vector():
    s = _rfc_server()
    assert s.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert s.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert s.done and s.user == "user"


def test_the_stored_credential_holds_no_password():
    cred = make_credential("pencil", "SCRAM-SHA-256", RFC_SALT, 4096)
    doc = cred.to_json()
    assert set(doc) == {"salt", "iterations", "stored_key", "server_key"}
    assert ScramCredential.from_json(doc) == cred
    with pytest.raises(ValueError):
        ScramCredential.from_json({**doc, "iterations": MIN_ITERATIONS - 1})


def test_wrong_password_is_refused():
    s = _rfc_server(password="not-pencil")
    s.first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError, match="wrong proof"):
        s.final(RFC_CLIENT_FINAL)
    assert not s.done


def test_a_tampered_proof_is_refused():
    s = _rfc_server()
    s.first(RFC_CLIENT_FIRST)
    head, _, proof = RFC_CLIENT_FINAL.rpartition(b",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(ScramError, match="wrong proof"):
        s.final(head + b",p=" + base64.b64encode(bytes(raw)))


def test_nonce_mismatch_is_refused():
    s = _rfc_server()
    s.first(RFC_CLIENT_FIRST)
    # the client's proof is right for its message, but the nonce is not the one the server sent
    with pytest.raises(ScramError, match="nonce mismatch"):
        s.final(RFC_CLIENT_FINAL.replace(b"hvYD", b"hvYE"))


def test_unknown_user_gets_a_decoy_and_the_same_refusal():
    s = ScramServer("SCRAM-SHA-256", {}.get, RFC_SERVER_NONCE)
    first = s.first(RFC_CLIENT_FIRST)
    assert first.startswith(b"r=rOprNGfwEbeRWgbNEkqO" + RFC_SERVER_NONCE.encode() + b",s=")
    again = ScramServer("SCRAM-SHA-256", {}.get, "other-nonce").first(RFC_CLIENT_FIRST)
    assert first.split(b",")[1] == again.split(b",")[1]  # same salt each time, as a real user's
    with pytest.raises(ScramError, match="unknown user"):
        s.final(RFC_CLIENT_FINAL)


@pytest.mark.parametrize(
    "client_first",
    [b"p=tls-unique,,n=user,r=abc", b"n,,r=abc,n=user", b"n,a=admin,n=user,r=abc", b"n,,n=us=er,r=abc", b"garbage"],
)
def test_malformed_or_unsupported_client_first_is_refused(client_first):
    with pytest.raises(ScramError):
        _rfc_server().first(client_first)


def _client_final(password: str, mech: str, client_first_bare: str, server_first: str) -> tuple[str, bytes]:
    """RFC 5802 section 3, client side, written out: the final message and the expected
    server signature."""
    name = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}[mech]
    a = dict(p.split("=", 1) for p in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(name, password.encode(), base64.b64decode(a["s"]), int(a["i"]))
    client_key = hmac.new(salted, b"Client Key", name).digest()
    stored = hashlib.new(name, client_key).digest()
    without_proof = f"c=biws,r={a['r']}"
    auth = f"{client_first_bare},{server_first},{without_proof}".encode()
    proof = bytes(x ^ y for x, y in zip(client_key, hmac.new(stored, auth, name).digest(), strict=True))
    server_sig = hmac.new(hmac.new(salted, b"Server Key", name).digest(), auth, name).digest()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_sig


@pytest.mark.parametrize("mech", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
def test_users_file_round_trip_and_exchange(tmp_path, mech):
    path = write_users_file(tmp_path / "users.json", {"detector": "pw-d", "a,b=c": "pw-x"})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "pw-d" not in path.read_text()
    users = load_users_file(path)
    for user, quoted, pw in (("detector", "detector", "pw-d"), ("a,b=c", "a=2Cb=3Dc", "pw-x")):
        s = ScramServer(mech, lambda u: users.get(u, {}).get(mech), "srvnonce")
        bare = f"n={quoted},r=clinonce"
        server_first = s.first(f"n,,{bare}".encode()).decode()
        final, server_sig = _client_final(pw, mech, bare, server_first)
        assert s.final(final.encode()) == b"v=" + base64.b64encode(server_sig)
        assert s.user == user
