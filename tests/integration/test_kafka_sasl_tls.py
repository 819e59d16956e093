"""Our Kafka clients against a SASL/SCRAM + TLS server (issue #16 item 2): the embedded broker
behind FlashRecovery's gateway (shared/kafka_gateway.py), with the aiokafka options made by
shared/kafka_security.client_kwargs from the settings every service reads."""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from flashrecovery.secure import WATCHER, SecureFiles, write_secure_files
from flashrecovery.shared import kafka_wire as W
from flashrecovery.shared.kafka_security import client_kwargs
from flashrecovery.shared.settings import KafkaSecuritySettings
from flashrecovery.shared.stack import Stack, start_stack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> tuple[Stack, SecureFiles]:
    d = tmp_path_factory.mktemp("sasl")
    files = write_secure_files(d / "secrets")
    stack = start_stack(d, kafka_tls=files.kafka_tls)
    yield stack, files
    stack.stop()


def _gateway_log(stack: Stack) -> list[dict]:
    gw = next(p for p in stack.owned if p.name == "kafka-gateway")
    lines = []
    for line in gw.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def _auth_lines(stack: Stack, outcome: str) -> list[dict]:
    return [e for e in _gateway_log(stack) if e.get("event") == "kafka_auth" and e.get("outcome") == outcome]


async def _wait_auth_line(stack: Stack, outcome: str, before: int) -> list[dict]:
    for _ in range(50):
        found = _auth_lines(stack, outcome)
        if len(found) > before:
            return found
        await asyncio.sleep(0.1)
    return _auth_lines(stack, outcome)


def test_the_broker_lists_the_sasl_apis_the_gateway_answers(secure):
    """tansu's own ApiVersions (asked on its private port) names SaslHandshake and
    SaslAuthenticate in the versions the gateway answers; if a broker did not, with_sasl_apis
    adds them."""
    stack, _ = secure
    broker = next(p for p in stack.owned if p.name == "broker")
    port = int(str(list(broker.proc.args)[3]).rpartition(":")[2])
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(W.frame(struct.pack(">hhih", W.API_VERSIONS, 0, 1, -1)))
        (n,) = struct.unpack(">i", s.recv(4))
        payload = b""
        while len(payload) < n:
            payload += s.recv(n - len(payload))
    versions = W.api_versions(payload, 0)
    assert versions[W.SASL_HANDSHAKE][1] >= W.HANDSHAKE_VERSIONS[1]
    assert versions[W.SASL_AUTHENTICATE][1] >= W.AUTHENTICATE_VERSIONS[1]
    # the rewrite, on a list without them (v0 encoding)
    count = struct.unpack_from(">i", payload, 6)[0]
    kept = [payload[10 + 6 * i : 16 + 6 * i] for i in range(count)]
    kept = [e for e in kept if struct.unpack(">h", e[:2])[0] not in (W.SASL_HANDSHAKE, W.SASL_AUTHENTICATE)]
    stripped = payload[:6] + struct.pack(">i", len(kept)) + b"".join(kept) + payload[10 + 6 * count :]
    assert W.SASL_HANDSHAKE not in W.api_versions(stripped, 0)
    added = W.api_versions(W.with_sasl_apis(stripped, 0), 0)
    assert added[W.SASL_HANDSHAKE] == W.HANDSHAKE_VERSIONS
    assert added[W.SASL_AUTHENTICATE] == W.AUTHENTICATE_VERSIONS


async def test_scram_sha512_over_tls_round_trips_a_record(secure):
    stack, files = secure
    kw = client_kwargs(files.kafka_security())
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    before = len(_auth_lines(stack, "ok"))
    p = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, **kw)
    await p.start()
    try:
        await p.send_and_wait(topic, b"over tls", key=b"k")
    finally:
        await p.stop()
    c = AIOKafkaConsumer(topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest", **kw)
    await c.start()
    try:
        rec = await asyncio.wait_for(c.getone(), 30)
    finally:
        await c.stop()
    assert rec.value == b"over tls"
    ok = _auth_lines(stack, "ok")
    assert len(ok) > before and ok[-1]["principal"] == WATCHER and ok[-1]["mechanism"] == "SCRAM-SHA-512"
    # the gateway's address is what clients learn: the broker's private port is never named
    assert all(str(b.port) == stack.kafka_bootstrap.rpartition(":")[2] for b in c._client.cluster.brokers())


async def test_a_wrong_password_is_refused(secure, tmp_path):
    stack, files = secure
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    sec = files.kafka_security().model_copy(update={"sasl_password_file": str(wrong)})
    host, _, port = stack.kafka_bootstrap.rpartition(":")
    before = len(_auth_lines(stack, "refused"))
    with pytest.raises(SaslAuthenticationFailed):
        conn = await create_conn(host, int(port), **client_kwargs(sec))
        conn.close()
    refused = await _wait_auth_line(stack, "refused", before)
    assert len(refused) > before
    assert refused[-1]["principal"] == WATCHER and "wrong proof" in refused[-1]["reason"]
    # a whole client: it cannot start
    p = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, request_timeout_ms=5000, **client_kwargs(sec))
    with pytest.raises(KafkaConnectionError):
        await p.start()
    await p.stop()


async def test_an_unknown_user_is_refused(secure):
    stack, files = secure
    sec = files.kafka_security().model_copy(update={"sasl_username": "mallory"})
    host, _, port = stack.kafka_bootstrap.rpartition(":")
    with pytest.raises(SaslAuthenticationFailed):
        conn = await create_conn(host, int(port), **client_kwargs(sec))
        conn.close()


async def test_plaintext_and_untrusting_clients_get_nothing(secure, tmp_path):
    stack, files = secure
    host, _, port = stack.kafka_bootstrap.rpartition(":")
    # PLAINTEXT to the TLS port: the TLS handshake fails, the client gets no Kafka answer
    with pytest.raises(KafkaConnectionError):
        conn = await create_conn(host, int(port), request_timeout_ms=5000)
        conn.close()
    # TLS, but not trusting our CA (the system's CAs only): the client refuses the server
    sec = KafkaSecuritySettings(
        protocol="SASL_SSL", sasl_username=WATCHER, sasl_password_file=str(files.password_file(WATCHER))
    )
    kw = client_kwargs(sec)
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    with pytest.raises((ssl.SSLCertVerificationError, KafkaConnectionError)):
        conn = await create_conn(host, int(port), request_timeout_ms=5000, **kw)
        conn.close()
    # SASL_PLAINTEXT-style: TLS trusted but no SASL at all -> a Metadata request is refused
    tls_only = files.kafka_security().model_copy(update={"protocol": "SSL"})
    conn = await create_conn(host, int(port), request_timeout_ms=5000, **client_kwargs(tls_only))
    try:
        from aiokafka.protocol.metadata import MetadataRequest

        with pytest.raises(KafkaConnectionError):
            await conn.send(MetadataRequest([]))
    finally:
        conn.close()
    lines = await _wait_auth_line(stack, "refused", 0)
    assert any("before SASL" in e["reason"] for e in lines)


def test_users_file_holds_no_password(secure):
    _, files = secure
    password = files.password_file(WATCHER).read_text()
    assert len(password) >= 24 and password not in Path(files.users_file).read_text()
