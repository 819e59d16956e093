"""The bus layer against hostile input, without a broker: a fake Kafka producer that refuses
what a real one refuses (a message over 1 MiB), records built by hand."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass

import orjson
import pytest
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import DEAD_LETTER_RAW_LIMIT, DeadLetter, NodeHeartbeat, decode_dead_letter, encode
from flashrecovery.shared.settings import BusSettings

pytestmark = pytest.mark.timeout(30)

MAX_REQUEST = 1 << 20  # aiokafka's default max_request_size


@dataclass
class Record:
    topic: str
    value: bytes | None
    key: bytes | None = b"node-0"
    partition: int = 0
    offset: int = 7
    timestamp: int = 0


class FakeKafka:
    """Stands in for AIOKafkaProducer: keeps what was sent, refuses what a broker would."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.fail = fail

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers=None):
        if self.fail is not None:
            raise self.fail
        if len(value) > MAX_REQUEST:
            raise MessageSizeTooLargeError(f"{len(value)} bytes")
        self.sent.append((topic, value, key))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def _producer(fake: FakeKafka) -> busmod.Producer:
    p = busmod.Producer("127.0.0.1:1", BusSettings())
    p._p = fake
    return p


def _consumer(producer: busmod.Producer, handler, topics=(T.HEARTBEATS,), **kw) -> busmod.Consumer:
    return busmod.Consumer(
        "127.0.0.1:1", BusSettings(handler_retries=0), list(topics), None, handler, producer, "test", **kw
    )


def _beat(seq: int = 1) -> bytes:
    return encode(NodeHeartbeat(job_id="j", generation=0, producer="t", node_id="node-0", seq=seq))


async def test_a_2mb_message_is_dead_lettered_as_a_bounded_prefix_with_digest_and_size() -> None:
    fake = FakeKafka()
    raw = bytes(range(256)) * (2 * 4096)  # 2 MiB
    ok = await _producer(fake).dead_letter(Record("x.heartbeats", raw, key=b"k" * 100_000), "too big", "detector")
    assert ok and len(fake.sent) == 1
    topic, value, key = fake.sent[0]
    assert len(value) < 256 * 1024
    letter = decode_dead_letter(value)
    assert letter.raw_truncated and letter.raw_size == len(raw)
    assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert base64.b64decode(letter.raw_b64) == raw[:DEAD_LETTER_RAW_LIMIT]
    assert len(letter.key or "") <= 2048 and letter.schema_version == 1


async def test_a_small_message_is_kept_whole() -> None:
    letter = DeadLetter.of(topic="t", partition=0, offset=1, key=None, value=b"{not json", reason="r", consumer="c")
    assert base64.b64decode(letter.raw_b64) == b"{not json" and not letter.raw_truncated
    assert letter.raw_size == 9


def test_a_dead_letter_written_before_the_new_fields_still_reads() -> None:
    old = orjson.dumps(
        {
            "topic": "t",
            "partition": 0,
            "offset": 3,
            "key": None,
            "reason": "not JSON",
            "raw_b64": base64.b64encode(b"x").decode(),
            "consumer": "detector",
            "at": 1.0,
        }
    )
    letter = decode_dead_letter(old)
    assert letter.raw_size is None and letter.raw_sha256 is None and not letter.raw_truncated


async def test_a_dead_letter_that_cannot_be_produced_is_counted_and_the_consumer_goes_on() -> None:
    fake = FakeKafka(fail=KafkaError("broker says no"))
    producer = _producer(fake)
    seen: list[int] = []

    async def handler(event, record) -> None:
        seen.append(event.seq)

    c = _consumer(producer, handler)
    await c._handle_records([Record("hb", b"\xff" * (2 << 20)), Record("hb", _beat(5))])
    assert seen == [5]
    assert c.dead_lettered == 1 and producer.dead_letter_failures == 1


async def test_a_2mb_poison_message_does_not_stop_a_consumer() -> None:
    fake = FakeKafka()
    producer = _producer(fake)
    seen: list[int] = []

    async def handler(event, record) -> None:
        seen.append(event.seq)

    c = _consumer(producer, handler)
    big = b'{"schema_version": 1, "kind": "node_heartbeat", "pad": "' + b"a" * (2 << 20) + b'"}'
    await c._handle_records([Record("hb", big), Record("hb", _beat(6))])
    assert seen == [6] and c.dead_lettered == 1 and len(fake.sent) == 1


async def test_a_failing_batch_handler_falls_back_to_one_by_one_and_keeps_going() -> None:
    producer = _producer(FakeKafka())
    seen: list[int] = []

    async def one(event, record) -> None:
        if event.seq == 2:
            raise ValueError("poison")
        seen.append(event.seq)

    async def batch(items) -> None:
        for event, record in items:
            await one(event, record)

    c = _consumer(producer, one, batch_handler=batch)
    await c._handle_records([Record("hb", _beat(1)), Record("hb", _beat(2)), Record("hb", _beat(3))])
    assert 3 in seen and c.dead_lettered == 1


async def test_the_dead_letter_topic_is_never_dead_lettered_again() -> None:
    """`flashrecovery events --topics deadletter` reads records with no event envelope: they
    must not be copied back onto the topic being read (a copy of a copy, forever)."""
    fake = FakeKafka()
    producer = _producer(fake)
    letter = DeadLetter.of(topic="t", partition=0, offset=1, key=None, value=b"x", reason="r", consumer="c")
    raw = orjson.dumps(letter.model_dump(mode="json"))

    async def handler(event, record) -> None:
        pass

    c = _consumer(producer, handler, topics=(T.DEAD_LETTER,))
    await c._handle_records([Record(busmod.topic_name(T.DEAD_LETTER, BusSettings()), raw)])
    assert fake.sent == []


async def test_the_events_tool_reads_dead_letters() -> None:
    from flashrecovery import tools

    letter = DeadLetter.of(topic="t", partition=0, offset=1, key=None, value=b"x" * 10, reason="r", consumer="c")
    got = tools._decode_or_dead_letter(orjson.dumps(letter.model_dump(mode="json")))
    assert isinstance(got, DeadLetter) and "size=10" in tools._line(got)
