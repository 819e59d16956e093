"""A group commit the broker refuses (a restarted broker that lost the group, a rebalance) must not
stop a consumer. Seen: the detector died of a CommitFailedError after a broker restart and never
detected the next crash."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, UnknownMemberIdError

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import WorkerExit, encode
from flashrecovery.shared.settings import BusSettings

BUS = BusSettings(handler_retries=0)


@dataclass
class Rec:
    topic: str
    value: bytes
    offset: int
    key: bytes = b"k"
    partition: int = 0
    timestamp: int = 0
    headers: tuple = ()


@dataclass
class GroupThatForgets:
    """Hands out one record per poll; every commit but the last fails as after a broker restart."""

    records: list[Rec]
    failures: list[Exception]
    commits: int = 0
    polled: list[int] = field(default_factory=list)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def assignment(self) -> set:
        return set()

    def highwater(self, tp) -> None:
        return None

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        await asyncio.sleep(0)
        if not self.records:
            return {}
        rec = self.records.pop(0)
        self.polled.append(rec.offset)
        return {TopicPartition(rec.topic, 0): [rec]}

    async def commit(self) -> None:
        self.commits += 1
        if self.failures:
            raise self.failures.pop(0)


def _exit(rank: int) -> WorkerExit:
    return WorkerExit(
        job_id="j", generation=0, producer="sidecar-node-0", node_id="node-0", rank=rank, pid=100 + rank, signal=9
    )


async def test_a_refused_commit_leaves_the_consumer_running() -> None:
    name = busmod.topic_name(T.WORKER_EVENTS, BUS)
    fake = GroupThatForgets(
        records=[Rec(name, encode(_exit(r)), offset=r) for r in range(3)],
        failures=[CommitFailedError("group rebalanced"), UnknownMemberIdError("group lost")],
    )
    seen: list[int] = []

    async def handler(ev, record) -> None:
        seen.append(ev.rank)

    c = busmod.Consumer("127.0.0.1:1", BUS, [T.WORKER_EVENTS], "g", handler, producer=None, name="probe")
    await c._c.stop()  # the real client is never started: the fake replaces it
    c._c = fake
    task = asyncio.create_task(c.run())
    try:
        async with asyncio.timeout(5):
            while len(seen) < 3:
                await asyncio.sleep(0.01)
    finally:
        c.stop()
        await asyncio.wait_for(task, 5)
    assert seen == [0, 1, 2]  # the records after both refused commits were handled
    assert c.commit_failures == 2 and fake.commits >= 3
