"""A thin aiokafka layer: typed produce, consume-handle-commit, dead letters, graceful drain.

Delivery is at-least-once: offsets are committed only after the handler returned, so handlers
must be idempotent (they are: see keys.seen and the registry's fenced writes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import BaseModel

from . import metrics as M
from . import topics as T
from .kafka_security import client_kwargs
from .logging import get_logger
from .schemas import DeadLetter, SchemaError, decode, encode
from .settings import BusSettings
from .signing import Keyring, load_keyring

RESET_CHECK_S = 0.5  # how often a consumer looks for partitions recreated by a broker restart
Handler = Callable[[Any, Any], Awaitable[None]]  # (event, raw ConsumerRecord)


def topic_name(topic: T.Topic, bus: BusSettings) -> str:
    return T.with_namespace(topic.name, bus.topic_namespace)


def keyring_of(bus: BusSettings) -> tuple[Keyring | None, frozenset[str]]:
    """The configured keyring (None: signing off) and the topic names whose records it tags."""
    if not bus.signing_key_file:
        return None, frozenset()
    return load_keyring(bus.signing_key_file), frozenset(topic_name(t, bus) for t in T.SIGNED)


def new_topics(bus: BusSettings, wanted: Iterable[T.Topic], existing: set[str]) -> list[NewTopic]:
    """The topics to create: partitions, replication factor and min.insync.replicas from `bus`."""
    configs = {} if bus.min_insync_replicas is None else {"min.insync.replicas": str(bus.min_insync_replicas)}
    return [
        NewTopic(
            topic_name(t, bus), getattr(bus, t.partitions_setting), bus.replication_factor, topic_configs=dict(configs)
        )
        for t in wanted
        if topic_name(t, bus) not in existing
    ]


def producer_config(bus: BusSettings) -> dict[str, Any]:
    """AIOKafkaProducer's durability and batching arguments from `bus`."""
    return {
        "linger_ms": bus.linger_ms,
        "max_batch_size": min(bus.max_batch_bytes, 1 << 20),
        "acks": "all" if bus.producer_acks == "all" else int(bus.producer_acks),
        "enable_idempotence": bus.idempotence,
    }


async def ensure_topics(
    bootstrap: str, bus: BusSettings, wanted: Iterable[T.Topic] = T.ALL, timeout_s: float = 30.0
) -> None:
    """Create the topics with the configured partition counts; existing ones are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000, **client_kwargs(bus.security))
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        new = new_topics(bus, wanted, set(await admin.list_topics()))
        if new:
            try:
                await asyncio.wait_for(admin.create_topics(new), timeout_s)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def read_to_end(bootstrap: str, bus: BusSettings, topic: T.Topic, timeout_s: float = 15.0) -> list[Any]:
    """Every record of `topic` from its first offset to its end as of the call: no consumer
    group, nothing committed (an onlooker such as `flashrecovery deadletters`). A topic that
    does not exist yet has no records. TimeoutError when the end is not reached in timeout_s."""
    name = topic_name(topic, bus)
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=10000,
        **client_kwargs(bus.security),
    )
    await asyncio.wait_for(c.start(), timeout_s)
    out: list[Any] = []
    try:

        async def _read() -> None:
            if name not in await c.topics():
                return
            parts = [TopicPartition(name, p) for p in sorted(c.partitions_for_topic(name) or ())]
            c.assign(parts)
            end = await c.end_offsets(parts)
            await c.seek_to_beginning(*parts)
            while [tp for tp in parts if await c.position(tp) < end[tp]]:
                for records in (await c.getmany(*parts, timeout_ms=200)).values():
                    out.extend(r for r in records if r.offset < end[TopicPartition(r.topic, r.partition)])

        await asyncio.wait_for(_read(), timeout_s)
    finally:
        await c.stop()
    return sorted(out, key=lambda r: (r.timestamp, r.partition, r.offset))


class Producer:
    def __init__(self, bootstrap: str, bus: BusSettings, client_id: str = "flashrecovery") -> None:
        self._bus = bus
        self._p = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id=client_id, **producer_config(bus), **client_kwargs(bus.security)
        )
        self._keyring, self._signed = keyring_of(bus)
        self.sent = 0
        self.dead_letter_failures = 0  # dead letters that could not be produced (logged)
        self._log = get_logger("bus", client_id=client_id)

    async def start(self) -> None:
        await self._p.start()

    async def stop(self) -> None:
        await self._p.flush()  # drain: nothing handed to us is dropped on shutdown
        await self._p.stop()

    async def publish(self, event: BaseModel, *, wait: bool = False) -> None:
        """Keyed produce onto the event's topic. wait=False lets the producer batch (linger)."""
        name = topic_name(T.topic_for(event), self._bus)
        value = encode(event)
        fut = await self._p.send(name, value, key=T.key_for(event), headers=self._headers(name, value))
        self.sent += 1
        if wait:
            await fut

    async def publish_raw(self, topic: T.Topic, value: bytes, key: bytes | None = None) -> None:
        name = topic_name(topic, self._bus)
        await (await self._p.send(name, value, key=key, headers=self._headers(name, value)))

    def _headers(self, topic: str, value: bytes) -> list[tuple[str, bytes]] | None:
        if self._keyring is None or topic not in self._signed:
            return None
        return self._keyring.headers(topic, value)

    async def dead_letter(self, record: Any, reason: str, consumer: str) -> bool:
        """Publish a bounded copy of a record a consumer could not handle (DeadLetter.of: a
        prefix, the size and a digest of a large one, so it always fits on the broker). Never
        raises: a dead letter that cannot be produced is logged and counted
        (`dead_letter_failures`) and the consumer goes on; a bad message must not stop it.
        -> whether the letter was produced."""
        try:
            letter = DeadLetter.of(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key,
                value=record.value,
                reason=reason,
                consumer=consumer,
            )
            await self.publish_raw(
                T.DEAD_LETTER, orjson.dumps(letter.model_dump(mode="json")), key=str(record.topic).encode()[:256]
            )
            M.DEAD_LETTERS.labels(consumer, M.reason_class(reason)).inc()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.dead_letter_failures += 1
            self._log.error(
                "dead_letter_failed",
                error=repr(exc)[:500],
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=reason[:500],
                failures=self.dead_letter_failures,
            )
            return False

    async def flush(self) -> None:
        await self._p.flush()


def _behind(highwater: int | None, position: int) -> bool:
    """The broker's last fetch answer put the partition's end below where this consumer stands."""
    return highwater is not None and highwater < position


class Consumer:
    """Consume -> decode -> handle -> commit. Bad input is dead-lettered and skipped; a handler
    that keeps failing on one message is retried a bounded number of times, then dead-lettered,
    so one poison message never stalls a partition."""

    def __init__(
        self,
        bootstrap: str,
        bus: BusSettings,
        topics: Iterable[T.Topic],
        group_id: str | None,
        handler: Handler,
        producer: Producer,
        name: str,
        *,
        from_latest: bool = False,
        batch_handler: Callable[[list[tuple[Any, Any]]], Awaitable[None]] | None = None,
        dead_letters: bool = True,
        decoder: Callable[[bytes | None], Any] = decode,
    ) -> None:
        topics = list(topics)  # read twice: the subscription and the metrics' topic labels
        self._bus = bus
        self._decode = decoder  # bytes -> event, or SchemaError
        # False for a reader that only looks on (its topic's owner dead-letters bad input once):
        # bad records are logged and skipped.
        self._dead_letters = dead_letters
        self._dead_letter_topic = topic_name(T.DEAD_LETTER, bus)
        self.name = name
        self._handler = handler
        self._batch_handler = batch_handler
        self._producer = producer
        self._log = get_logger(name)
        self._stopping = asyncio.Event()
        self._c = AIOKafkaConsumer(
            *[topic_name(t, bus) for t in topics],
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest" if from_latest else "earliest",
            max_poll_records=2000,
            fetch_max_wait_ms=bus.fetch_max_wait_ms,
            session_timeout_ms=10000,
            heartbeat_interval_ms=1000,
            **client_kwargs(bus.security),
        )
        self._group = group_id is not None
        self._keyring, self._signed = keyring_of(bus)
        self._require_tags = bus.require_signatures
        self._topic_label = {topic_name(t, bus): t.name for t in topics}  # metrics: no namespace
        self.handled = 0
        self.dead_lettered = 0
        self.unauthenticated = 0  # records refused for a missing, forged or unknown-key tag
        self._ends: dict[Any, int] = {}  # partition -> end offset last seen
        self.partition_resets = 0  # partitions found recreated (a broker that lost its topics)
        self.commit_failures = 0  # group commits the broker refused (see _commit)

    async def start(self) -> None:
        await self._c.start()

    async def wait_assigned(self, timeout_s: float = 30.0) -> None:
        """Block until partitions are assigned (and positioned), so a test can publish after."""

        async def _wait() -> None:
            while not self._c.assignment():
                await asyncio.sleep(0.05)
            for tp in self._c.assignment():
                await self._c.position(tp)

        await asyncio.wait_for(_wait(), timeout_s)

    async def seek_to_time(self, ts_ms: int) -> None:
        """Position every assigned partition at its first record stamped at or after ts_ms (at
        the end where there is none): a reader without a group that wants recent history only."""
        parts = list(self._c.assignment())
        found = await self._c.offsets_for_times({tp: ts_ms for tp in parts}) if parts else {}
        for tp in parts:
            hit = found.get(tp)
            if hit is None:
                await self._c.seek_to_end(tp)
            else:
                self._c.seek(tp, hit.offset)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        next_check = 0.0
        try:
            while not self._stopping.is_set():
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + RESET_CHECK_S
                    await self._follow_partition_resets()
                batches = await self._c.getmany(timeout_ms=100, max_records=2000)
                if not batches:
                    continue
                for tp, records in batches.items():
                    await self._handle_records(records)
                    self._record_metrics(tp, records)
                if self._group:
                    await self._commit()
        finally:
            await self._c.stop()

    async def _commit(self) -> None:
        """Best effort: a group the broker lost (a restart that kept no state) or rebalanced
        refuses the commit; the consumer rejoins on its next poll and may see a few records
        again, which the idempotent handlers absorb. A failed commit must never stop a
        consumer: the detector died of one after a broker restart and missed the next crash."""
        try:
            await self._c.commit()
        except KafkaError as exc:
            self.commit_failures += 1
            self._log.warning("commit_failed", error=type(exc).__name__, failures=self.commit_failures)

    def _record_metrics(self, tp: Any, records: list[Any]) -> None:
        topic = self._topic_label.get(tp.topic, tp.topic)
        M.CONSUMED.labels(self.name, topic).inc(len(records))
        high = self._c.highwater(tp)  # from the last fetch response; None before one
        if high is not None:
            M.CONSUMER_LAG.labels(self.name, topic, str(tp.partition)).set(max(0, high - records[-1].offset - 1))

    async def _follow_partition_resets(self) -> None:
        """A partition whose end offset went down was created anew: the embedded broker keeps
        topics in memory, so a restart loses them and they are created again empty. Reading
        on from the old position would skip the new topic's first records (up to the old
        offset), e.g. the commands of the next recovery: start it from the beginning instead.
        Handlers are idempotent, so a record read twice around the restart is harmless. The
        decrease is seen if fewer records than the old end arrive within RESET_CHECK_S of the
        restart (control topics carry a few per recovery)."""
        parts = list(self._c.assignment())
        if not parts:
            return
        try:
            ends = await asyncio.wait_for(self._c.end_offsets(parts), 2.0)
            # A fetch answered with a high watermark below our position counts too: records
            # read since the last check (a plan produced just before the restart) raised the
            # position past the end seen then, and the broker answers a fetch past a recreated
            # topic's end with no records, not an error. (Not end_offsets against the position:
            # tansu 0.6.0 answers ListOffsets with the last batch's base offset + 1.)
            at = {tp: await asyncio.wait_for(self._c.position(tp), 2.0) for tp in ends}
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - broker away: checked again on the next round
            return
        reset = [
            tp for tp, end in ends.items() if end < self._ends.get(tp, 0) or _behind(self._c.highwater(tp), at[tp])
        ]
        self._ends.update(ends)
        if reset:
            await self._c.seek_to_beginning(*reset)
            self.partition_resets += len(reset)
            self._log.warning(
                "partitions_recreated",
                partitions=[f"{tp.topic}/{tp.partition}" for tp in reset][:20],
                resets=self.partition_resets,
            )

    async def _handle_records(self, records: list[Any]) -> None:
        decoded: list[tuple[Any, Any]] = []
        for record in records:
            why = self._auth_refusal(record)
            if why is not None:
                self.unauthenticated += 1
                await self._dead_letter(record, f"unauthenticated: {why}")
                continue
            try:
                decoded.append((self._decode(record.value), record))
            except SchemaError as exc:
                await self._dead_letter(record, str(exc))
            except Exception as exc:  # noqa: BLE001 - whatever a hostile record provokes
                await self._dead_letter(record, f"undecodable: {exc!r}")
        if self._batch_handler is not None and decoded:
            try:
                await self._batch_handler(decoded)
                self.handled += len(decoded)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one record must not stop the consumer
                # One by one instead, with the bounded retries and dead letters of _handle_one
                # (handlers are idempotent: what the batch already did is not done twice).
                self._log.warning("batch_handler_failed", error=repr(exc)[:500], records=len(decoded))
        for event, record in decoded:
            await self._handle_one(event, record)

    def _auth_refusal(self, record: Any) -> str | None:
        """Why a record of a signed topic must not be acted on (shared/signing.py), or None."""
        if self._keyring is None or record.topic not in self._signed:
            return None
        why = self._keyring.refusal(record.topic, record.value, record.headers)
        if why is not None and why.startswith("unsigned") and not self._require_tags:
            return None
        return why

    async def _handle_one(self, event: Any, record: Any) -> None:
        for attempt in range(self._bus.handler_retries + 1):
            try:
                await self._handler(event, record)
                self.handled += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the consumer
                self._log.warning(
                    "handler_failed", attempt=attempt, error=repr(exc), topic=record.topic, offset=record.offset
                )
                if attempt < self._bus.handler_retries:
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
                else:
                    await self._dead_letter(record, f"handler failed {attempt + 1}x: {exc!r}")

    async def _dead_letter(self, record: Any, reason: str) -> None:
        if not self._dead_letters or record.topic == self._dead_letter_topic:
            # An onlooker, or a record of the dead-letter topic itself: dead-lettering it again
            # would feed a reader of that topic its own output, a copy of a copy, forever.
            self._log.info(
                "bad_input_skipped",
                reason=reason[:500],
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            return
        self.dead_lettered += 1
        self._log.warning(
            "dead_lettered",
            reason=reason[:500],
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            size=len(record.value or b""),
        )
        await self._producer.dead_letter(record, reason, self.name)
