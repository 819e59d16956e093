"""A broker that loses its topics (the embedded broker keeps them in memory; a restart creates
them again empty): a consumer must read the new topic from its first record, not from its old
offset, or it skips the next recovery's commands (seen: a sidecar missed a pause)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import ExecutorCommand
from flashrecovery.shared.settings import BusSettings
from flashrecovery.shared.stack import OwnedProcess, free_port, start_broker

pytestmark = pytest.mark.timeout(120)


def _command(i: int) -> ExecutorCommand:
    return ExecutorCommand(
        job_id="j", generation=0, producer="test", command_id=f"c{i}", plan_id="p", incident_id="i", action="pause"
    )


async def _until(cond, timeout_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


@dataclass
class _Rig:
    """A broker of its own and a commands consumer reading it (the broker may be restarted)."""

    tmp_path: Path
    port: int
    broker: OwnedProcess
    bootstrap: str
    bus: BusSettings
    producer: busmod.Producer | None = None
    consumer: busmod.Consumer | None = None
    got: list[str] = field(default_factory=list)

    def restart_broker(self) -> None:
        self.broker.stop()
        self.broker = start_broker(self.tmp_path, self.port)  # same address, no topics, no records


@contextlib.asynccontextmanager
async def _commands_reader(tmp_path: Path, linger_ms: int, from_latest: bool = False):
    port = free_port()
    rig = _Rig(tmp_path, port, start_broker(tmp_path, port), f"127.0.0.1:{port}", BusSettings(linger_ms=linger_ms))

    async def handle(event, _record) -> None:
        rig.got.append(event.command_id)

    rig.producer = producer = busmod.Producer(rig.bootstrap, rig.bus)
    rig.consumer = consumer = busmod.Consumer(
        rig.bootstrap, rig.bus, [T.COMMANDS], None, handle, producer, "test", from_latest=from_latest
    )
    task = None
    try:
        await busmod.ensure_topics(rig.bootstrap, rig.bus)
        await asyncio.wait_for(producer.start(), 30)
        await asyncio.wait_for(consumer.start(), 30)
        await consumer.wait_assigned(30)
        task = asyncio.create_task(consumer.run())
        yield rig
    finally:
        consumer.stop()
        if task is not None:
            await asyncio.wait_for(task, 15)
        await producer.stop()
        rig.broker.stop()


@pytest.mark.parametrize(
    "check_every_s",
    [
        busmod.RESET_CHECK_S,  # checked every half second: the empty topic's end is seen at once
        # No check between reading the records and the restart: the end offset last seen is
        # the empty topic's, and only the consumer's position shows the topic was recreated
        # (seen: the executor never received the superseding plan after a broker restart).
        4.0,
    ],
)
async def test_a_consumer_reads_a_recreated_topic_from_its_first_record(tmp_path, monkeypatch, check_every_s):
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the restart's connection errors
    monkeypatch.setattr(busmod, "RESET_CHECK_S", check_every_s)
    async with _commands_reader(tmp_path, linger_ms=0, from_latest=True) as rig:
        consumer, producer, got = rig.consumer, rig.producer, rig.got
        await _until(lambda: bool(consumer._ends), 30, "the first check (it sees the empty topic)")
        for i in range(6):
            await producer.publish(_command(i), wait=True)
        await _until(lambda: len(got) == 6, 30, "the first six commands")

        rig.restart_broker()
        await busmod.ensure_topics(rig.bootstrap, rig.bus)
        if check_every_s > busmod.RESET_CHECK_S:
            # the new topic stays empty until a check after the restart has looked at it
            await _until(lambda: consumer.partition_resets >= 1, 30, "the recreated topic to be noticed")
        for i in range(6, 9):  # fewer records than the consumer's old offset
            await asyncio.wait_for(producer.publish(_command(i), wait=True), 30)
        await _until(lambda: {"c6", "c7", "c8"} <= set(got), 30, "the commands sent after the restart")
        assert consumer.partition_resets >= 1


async def test_batched_records_are_not_taken_for_a_recreated_topic(tmp_path):
    """tansu answers ListOffsets with the last batch's base offset + 1, below the position of a
    consumer that read the whole batch: comparing those two made a consumer start its topic over
    twice a second, forever (seen in the demo's watcher)."""
    async with _commands_reader(tmp_path, linger_ms=50) as rig:
        consumer, producer, got = rig.consumer, rig.producer, rig.got
        for batch in range(3):  # records sent together land in one batch
            await asyncio.gather(*(producer.publish(_command(10 * batch + i)) for i in range(5)))
            await producer.flush()
            await _until(lambda b=batch: len(got) == 5 * (b + 1), 30, f"batch {batch}")
        await asyncio.sleep(3 * busmod.RESET_CHECK_S + 0.5)  # several checks after the last batch
        assert consumer.partition_resets == 0
        assert len(got) == 15  # nothing read twice
