"""Kafka client security settings -> aiokafka keyword arguments (shared/kafka_security.py)."""

from __future__ import annotations

import ssl

import pytest

from flashrecovery.shared.kafka_security import client_kwargs
from flashrecovery.shared.settings import ConfigError, KafkaSecuritySettings, load_settings

pytestmark = pytest.mark.unit


def test_plaintext_adds_nothing() -> None:
    assert client_kwargs(KafkaSecuritySettings()) == {}


def test_sasl_ssl_gives_every_client_scram_and_a_verifying_tls_context(tmp_path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    kw = client_kwargs(
        KafkaSecuritySettings(protocol="SASL_SSL", sasl_username="detector", sasl_password_file=str(tmp_path / "pw"))
    )
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("detector", "s3cret")
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_sasl_without_credentials_or_half_a_client_certificate_is_a_configuration_error(monkeypatch) -> None:
    monkeypatch.setenv("FLASHRECOVERY_BUS__SECURITY__PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="needs sasl_username and sasl_password_file"):
        load_settings()
    monkeypatch.setenv("FLASHRECOVERY_BUS__SECURITY__PROTOCOL", "SSL")
    monkeypatch.setenv("FLASHRECOVERY_BUS__SECURITY__SSL_CERTFILE", "/x/cert.pem")
    with pytest.raises(ConfigError, match="go together"):
        load_settings()
    monkeypatch.setenv("FLASHRECOVERY_BUS__SECURITY__PROTOCOL", "TLS")
    with pytest.raises(ConfigError, match="FLASHRECOVERY_BUS__SECURITY__PROTOCOL"):
        load_settings()
