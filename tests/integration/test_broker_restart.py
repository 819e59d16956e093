"""A broker that loses its topics (the embedded broker keeps them in memory; a restart creates
them again empty): a consumer must read the new topic from its first record, not from its old
offset, or it skips the next recovery's commands (seen: a sidecar missed a pause)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import ExecutorCommand
from flashrecovery.shared.settings import BusSettings
from flashrecovery.shared.stack import free_port, start_broker

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
    port = free_port()
    broker = start_broker(tmp_path, port)
    bootstrap, bus = f"127.0.0.1:{port}", BusSettings(linger_ms=0)
    got: list[str] = []

    async def handle(event, _record) -> None:
        got.append(event.command_id)

    producer = busmod.Producer(bootstrap, bus)
    consumer = busmod.Consumer(bootstrap, bus, [T.COMMANDS], None, handle, producer, "test", from_latest=True)
    task = None
    try:
        await busmod.ensure_topics(bootstrap, bus)
        await asyncio.wait_for(producer.start(), 30)
        await asyncio.wait_for(consumer.start(), 30)
        await consumer.wait_assigned(30)
        task = asyncio.create_task(consumer.run())
        await _until(lambda: bool(consumer._ends), 30, "the first check (it sees the empty topic)")
        for i in range(6):
            await producer.publish(_command(i), wait=True)
        await _until(lambda: len(got) == 6, 30, "the first six commands")

        broker.stop()
        broker = start_broker(tmp_path, port)  # same address, no topics, no records
        await busmod.ensure_topics(bootstrap, bus)
        if check_every_s > busmod.RESET_CHECK_S:
            # the new topic stays empty until a check after the restart has looked at it
            await _until(lambda: consumer.partition_resets >= 1, 30, "the recreated topic to be noticed")
        for i in range(6, 9):  # fewer records than the consumer's old offset
            await asyncio.wait_for(producer.publish(_command(i), wait=True), 30)
        await _until(lambda: {"c6", "c7", "c8"} <= set(got), 30, "the commands sent after the restart")
        assert consumer.partition_resets >= 1
    finally:
        consumer.stop()
        if task is not None:
            await asyncio.wait_for(task, 15)
        await producer.stop()
        broker.stop()


async def test_batched_records_are_not_taken_for_a_recreated_topic(tmp_path):
    """tansu answers ListOffsets with the last batch's base offset + 1, below the position of a
    consumer that read the whole batch: comparing those two made a consumer start its topic over
    twice a second, forever (seen in the demo's watcher)."""
    port = free_port()
    broker = start_broker(tmp_path, port)
    bootstrap, bus = f"127.0.0.1:{port}", BusSettings(linger_ms=50)
    got: list[str] = []

    async def handle(event, _record) -> None:
        got.append(event.command_id)

    producer = busmod.Producer(bootstrap, bus)
    consumer = busmod.Consumer(bootstrap, bus, [T.COMMANDS], None, handle, producer, "test")
    task = None
    try:
        await busmod.ensure_topics(bootstrap, bus)
        await asyncio.wait_for(producer.start(), 30)
        await asyncio.wait_for(consumer.start(), 30)
        await consumer.wait_assigned(30)
        task = asyncio.create_task(consumer.run())
        for batch in range(3):  # records sent together land in one batch
            await asyncio.gather(*(producer.publish(_command(10 * batch + i)) for i in range(5)))
            await producer.flush()
            await _until(lambda b=batch: len(got) == 5 * (b + 1), 30, f"batch {batch}")
        await asyncio.sleep(3 * busmod.RESET_CHECK_S + 0.5)  # several checks after the last batch
        assert consumer.partition_resets == 0
        assert len(got) == 15  # nothing read twice
    finally:
        consumer.stop()
        if task is not None:
            await asyncio.wait_for(task, 15)
        await producer.stop()
        broker.stop()
