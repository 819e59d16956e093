"""Kafka durability settings reach the topics FlashRecovery creates and the producers it builds;
the embedded defaults are unchanged (replication 1, acks 1, no idempotence)."""

from __future__ import annotations

import pytest

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.settings import BusSettings, ConfigError, load_settings

PRODUCTION = {
    "FLASHRECOVERY_BUS__REPLICATION_FACTOR": "3",
    "FLASHRECOVERY_BUS__MIN_INSYNC_REPLICAS": "2",
    "FLASHRECOVERY_BUS__PRODUCER_ACKS": "all",
    "FLASHRECOVERY_BUS__IDEMPOTENCE": "true",
}


def test_embedded_defaults_are_unchanged() -> None:
    bus = BusSettings()
    assert busmod.producer_config(bus) == {
        "linger_ms": 5,
        "max_batch_size": 1 << 20,
        "acks": 1,
        "enable_idempotence": False,
    }
    new = busmod.new_topics(bus, T.ALL, existing=set())
    assert {t.replication_factor for t in new} == {1} and all(t.topic_configs == {} for t in new)


def test_production_settings_from_the_environment_reach_topics_and_producer(monkeypatch) -> None:
    for k, v in PRODUCTION.items():
        monkeypatch.setenv(k, v)
    bus = load_settings().bus
    new = busmod.new_topics(bus, T.ALL, existing={T.HEARTBEATS.name})
    assert [t.name for t in new] == [t.name for t in T.ALL if t is not T.HEARTBEATS]
    assert {(t.replication_factor, t.topic_configs["min.insync.replicas"]) for t in new} == {(3, "2")}
    built = {}

    class Capture:
        def __init__(self, **kw) -> None:
            built.update(kw)

    monkeypatch.setattr(busmod, "AIOKafkaProducer", Capture)
    busmod.Producer("127.0.0.1:9", bus)
    assert built["acks"] == "all" and built["enable_idempotence"] is True


@pytest.mark.parametrize(
    "env, why",
    [
        ({"FLASHRECOVERY_BUS__IDEMPOTENCE": "true"}, "idempotence needs producer_acks=all"),
        ({"FLASHRECOVERY_BUS__MIN_INSYNC_REPLICAS": "2"}, "exceeds replication_factor"),
        ({"FLASHRECOVERY_BUS__PRODUCER_ACKS": "2"}, "FLASHRECOVERY_BUS__PRODUCER_ACKS"),
    ],
)
def test_inconsistent_durability_is_refused_at_start_up(monkeypatch, env, why) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=why):
        load_settings()


@pytest.mark.parametrize("env, wait_ms", [({}, 100), ({"FLASHRECOVERY_BUS__FETCH_MAX_WAIT_MS": "500"}, 500)])
def test_the_fetch_wait_reaches_every_consumer(monkeypatch, env, wait_ms) -> None:
    """100 ms on the embedded broker (it bounds each hop's delay there); a broker that answers
    held fetches at once (Apache Kafka) is given 500 by the environment."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    built = {}

    class Capture:
        def __init__(self, *topics, **kw) -> None:
            built.update(kw)

    monkeypatch.setattr(busmod, "AIOKafkaConsumer", Capture)

    async def handler(ev, record) -> None:
        pass

    busmod.Consumer("127.0.0.1:9", load_settings().bus, [T.COMMANDS], None, handler, None, "c")  # type: ignore[arg-type]
    assert built["fetch_max_wait_ms"] == wait_ms


def test_a_fetch_wait_out_of_range_is_refused_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("FLASHRECOVERY_BUS__FETCH_MAX_WAIT_MS", "0")
    with pytest.raises(ConfigError, match="FLASHRECOVERY_BUS__FETCH_MAX_WAIT_MS"):
        load_settings()
