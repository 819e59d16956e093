"""Schema validation at the broker (issue #16 item 4): the embedded broker started with the
per-topic JSON Schemas generated from the event models accepts every event the services
produce and refuses, at produce time, records that are not events of their topic."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.broker_schemas import write_broker_schemas
from flashrecovery.shared.schemas import (
    CommandAck,
    DeadLetter,
    ExecutorCommand,
    NodeHeartbeat,
    RankState,
    RankStatus,
    WorkerExit,
    encode,
)
from flashrecovery.shared.settings import BusSettings
from flashrecovery.shared.stack import free_port, start_broker

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def schema_broker(tmp_path):
    write_broker_schemas(tmp_path / "schemas")
    port = free_port()
    broker = start_broker(tmp_path, port, schema_dir=tmp_path / "schemas")
    yield f"127.0.0.1:{port}"
    broker.stop()


def _valid() -> dict[T.Topic, bytes]:
    beat = NodeHeartbeat(
        job_id="j",
        generation=0,
        producer="sidecar",
        node_id="node-0",
        seq=1,
        ranks=(RankStatus(rank=0, local_rank=0, pid=10, state=RankState.RUNNING, step=3, step_time_s=0.1),),
    )
    exit_ = WorkerExit(job_id="j", generation=0, producer="sidecar", node_id="node-0", rank=0, pid=10, signal=9)
    cmd = ExecutorCommand(
        job_id="j",
        generation=0,
        producer="executor-0",
        command_id="c",
        plan_id="p",
        incident_id="i",
        action="pause",
        fence_token=1,
    )
    ack = CommandAck(
        job_id="j",
        generation=0,
        producer="sidecar",
        command_id="c",
        plan_id="p",
        incident_id="i",
        action="pause",
        node_id="node-0",
        ok=True,
    )
    letter = DeadLetter.of(
        topic="x", partition=0, offset=1, key=None, value=b"\x00junk", reason="test", consumer="test"
    )
    return {
        T.HEARTBEATS: encode(beat),
        T.WORKER_EVENTS: encode(exit_),
        T.COMMANDS: encode(cmd),
        T.ACKS: encode(ack),
        T.DEAD_LETTER: orjson.dumps(letter.model_dump(mode="json")),
    }


async def test_the_broker_takes_events_and_refuses_what_is_not_one(schema_broker):
    bus = BusSettings(linger_ms=0)
    await busmod.ensure_topics(schema_broker, bus)
    p = AIOKafkaProducer(bootstrap_servers=schema_broker, request_timeout_ms=5000)
    await asyncio.wait_for(p.start(), 30)
    try:
        for topic, value in _valid().items():
            await asyncio.wait_for(p.send_and_wait(topic.name, value), 15)  # accepted

        wrong_kind = orjson.loads(_valid()[T.WORKER_EVENTS])  # a worker exit on the commands topic
        bad_type = {**orjson.loads(_valid()[T.WORKER_EVENTS]), "rank": "zero"}
        missing = {k: v for k, v in orjson.loads(_valid()[T.COMMANDS]).items() if k != "action"}
        refused = [
            (T.COMMANDS, orjson.dumps(wrong_kind)),
            (T.WORKER_EVENTS, orjson.dumps(bad_type)),
            (T.COMMANDS, orjson.dumps(missing)),
            (T.HEARTBEATS, b"not json at all"),
            (T.ACKS, orjson.dumps([1, 2, 3])),
        ]
        for topic, value in refused:
            with pytest.raises(KafkaError):
                await asyncio.wait_for(p.send_and_wait(topic.name, value), 15)
    finally:
        await p.stop()
