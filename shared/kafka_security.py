"""KafkaSecuritySettings -> the keyword arguments every aiokafka client takes (producer,
consumer, admin), in one place so no client is left plaintext by accident."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from .settings import KafkaSecuritySettings


def client_kwargs(sec: KafkaSecuritySettings) -> dict[str, Any]:
    if sec.protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.protocol.endswith("SSL"):
        ctx = ssl.create_default_context(cafile=sec.ssl_cafile)  # verifies the broker's name too
        if sec.ssl_certfile:
            ctx.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile)
        out["ssl_context"] = ctx
    if sec.protocol.startswith("SASL"):
        assert sec.sasl_password_file is not None  # the settings model requires it
        out.update(
            sasl_mechanism=sec.sasl_mechanism,
            sasl_plain_username=sec.sasl_username,
            sasl_plain_password=Path(sec.sasl_password_file).read_text().strip(),
        )
    return out
