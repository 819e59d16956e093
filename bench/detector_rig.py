"""Simulated sidecars of a training job, as the detector sees them on the bus, and a reader of
the incidents topic: shared by the detector's integration tests and its latency benchmark
(bench/detector_latency.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from flashrecovery.shared import topics
from flashrecovery.shared.bus import Consumer, Producer
from flashrecovery.shared.schemas import (
    Degradation,
    FaultIncident,
    LogEvent,
    NodeHeartbeat,
    RankColumns,
    RankState,
    RankStatus,
    WorkerExit,
)
from flashrecovery.shared.settings import Settings


@dataclass
class SimRank:
    rank: int
    local_rank: int
    next_due: float
    last_advance: float
    step: int = 0
    dt: float = 0.1
    dt_used: float = 0.1  # the duration of the step in progress
    last_dt: float | None = None
    frozen: bool = False
    state: RankState = RankState.RUNNING
    phase: tuple[str, float, float] | None = None  # (name, expected_s, ends_at)


@dataclass
class FakeJob:
    """Sidecars of a training job as the detector sees them: one heartbeat per node per interval
    with each rank's committed step, last step time and seconds since its step last advanced
    (measured here, on the 'sidecar' clock, as a real sidecar does)."""

    producer: Producer
    job_id: str
    nodes: int = 4
    ranks_per_node: int = 2
    step_time: float = 0.1
    interval: float = 1.0
    generation: int = 0
    silent: set[str] = field(default_factory=set)
    last_beat: dict[str, float] = field(default_factory=dict)
    columns: bool = False  # send the ranks as rank_columns (sidecar setting rank_columns)

    def __post_init__(self) -> None:
        now = time.monotonic()
        self.ranks = {
            r: SimRank(r, r % self.ranks_per_node, now + self.step_time, now, dt=self.step_time, dt_used=self.step_time)
            for r in range(self.nodes * self.ranks_per_node)
        }
        self.seq = {self.node_of(r): 0 for r in self.ranks}
        self._task: asyncio.Task | None = None

    def node_of(self, rank: int) -> str:
        return f"node-{rank // self.ranks_per_node}"

    def _advance(self, r: SimRank, now: float) -> None:
        if r.frozen or r.state is not RankState.RUNNING:
            return
        if r.phase is not None:
            if now < r.phase[2]:
                return
            r.next_due = max(r.next_due, r.phase[2] + r.dt)
            r.phase = None
        while now >= r.next_due:
            r.step += 1
            r.last_advance = r.next_due
            r.last_dt = r.dt_used
            r.dt_used = r.dt
            r.next_due = r.last_advance + r.dt

    def slow_step(self, seconds: float) -> None:
        """The step in progress takes `seconds` on every rank (a slow batch, a GC pause)."""
        for r in self.ranks.values():
            r.next_due = r.last_advance + seconds
            r.dt_used = seconds

    def long_phase(self, name: str, expected_s: float, actual_s: float) -> None:
        ends = time.monotonic() + actual_s
        for r in self.ranks.values():
            r.phase = (name, expected_s, ends)

    def heartbeat(self, node: str) -> NodeHeartbeat:
        now = time.monotonic()
        statuses = []
        for r in self.ranks.values():
            if self.node_of(r.rank) != node:
                continue
            self._advance(r, now)
            in_phase = r.phase is not None and now < r.phase[2]
            statuses.append(
                RankStatus(
                    rank=r.rank,
                    local_rank=r.local_rank,
                    pid=10000 + r.rank,
                    state=r.state,
                    step=r.step,
                    step_time_s=r.last_dt,
                    generation=self.generation,
                    long_phase=r.phase[0] if in_phase else None,
                    long_phase_expected_s=r.phase[1] if in_phase else None,
                    since_progress_s=now - r.last_advance,
                )
            )
        self.seq[node] += 1
        form = {"rank_columns": RankColumns.of(statuses)} if self.columns else {"ranks": tuple(statuses)}
        return NodeHeartbeat(
            job_id=self.job_id,
            generation=self.generation,
            producer=f"sidecar/{node}",
            node_id=node,
            seq=self.seq[node],
            interval_s=self.interval,
            **form,
        )

    async def _run(self) -> None:
        while True:
            for node in sorted(self.seq):
                if node not in self.silent:
                    await self.producer.publish(self.heartbeat(node))
                    self.last_beat[node] = time.monotonic()
            await self.producer.flush()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------------ faults
    async def crash(self, rank: int, signal: int = 9) -> float:
        r = self.ranks[rank]
        r.state = RankState.EXITED
        await self.producer.publish(
            WorkerExit(
                job_id=self.job_id,
                generation=self.generation,
                producer="sidecar",
                node_id=self.node_of(rank),
                rank=rank,
                pid=10000 + rank,
                signal=signal,
                step=r.step,
            ),
            wait=True,
        )
        return time.monotonic()

    async def log(self, rank: int | None, line: str, node: str | None = None) -> float:
        await self.producer.publish(
            LogEvent(
                job_id=self.job_id,
                generation=self.generation,
                producer="sidecar",
                node_id=node or self.node_of(rank),
                rank=rank,
                line=line,
            ),
            wait=True,
        )
        return time.monotonic()


class Watcher:
    """Reads the incidents topic back, stamping each event with its arrival (monotonic)."""

    def __init__(self, settings: Settings, producer: Producer) -> None:
        self.incidents: list[tuple[float, FaultIncident]] = []
        self.degradations: list[tuple[float, Degradation]] = []
        self.consumer = Consumer(
            settings.kafka_bootstrap, settings.bus, [topics.INCIDENTS], None, self._on, producer, "test-incidents"
        )

    async def _on(self, event, _record) -> None:
        if isinstance(event, FaultIncident):
            self.incidents.append((time.monotonic(), event))
        elif isinstance(event, Degradation):
            self.degradations.append((time.monotonic(), event))

    async def wait(self, cond, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                got = [(i.fault_class.value, i.root_cause_nodes) for _, i in self.incidents]
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; got {got}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_detector(
    settings: Settings, producer: Producer, instance: str
) -> AsyncIterator[tuple[Any, Watcher, FakeJob]]:
    """One DetectorService, an incidents Watcher and a (not yet started) FakeJob, all assigned
    their partitions; everything stopped on exit."""
    from flashrecovery.detector.app import DetectorService

    svc = DetectorService(settings, instance=instance)
    watcher = Watcher(settings, producer)
    await asyncio.wait_for(watcher.consumer.start(), 30)
    await asyncio.wait_for(svc.start(), 30)
    tasks = [asyncio.create_task(watcher.consumer.run()), asyncio.create_task(svc.run())]
    job = FakeJob(producer, settings.job_id)
    try:
        await watcher.consumer.wait_assigned(30)
        await svc.wait_assigned(30)
        yield svc, watcher, job
    finally:
        await job.stop()
        await svc.stop()
        watcher.consumer.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        await svc.close()
