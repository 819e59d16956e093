"""Worker events are checked against the registry's view of the job (core.admit) before they
change any detector state: the pure check, and the shell's batch path with a fake producer."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flashrecovery.detector import core
from flashrecovery.detector.app import DetectorService
from flashrecovery.shared.schemas import (
    FaultClass,
    LogEvent,
    NodeHeartbeat,
    RankColumns,
    RankState,
    RankStatus,
    WorkerExit,
)
from flashrecovery.shared.settings import Settings

pytestmark = pytest.mark.timeout(30)

JOB = "job-t"
TOPO = core.Topology(job_id=JOB, generation=0, world_size=4, nodes=frozenset({"node-0", "node-1", "spare-0"}))


def beat(node: str, seq: int, generation: int = 0, ranks=(0, 1), rank_gen: int = 0, columns=False) -> NodeHeartbeat:
    rows = tuple(
        RankStatus(
            rank=r,
            local_rank=i,
            pid=100 + (r or 0),
            state=RankState.RUNNING,
            step=seq,
            step_time_s=0.1,
            generation=rank_gen,
            since_progress_s=0.1,
        )
        for i, r in enumerate(ranks)
    )
    if columns:
        return NodeHeartbeat(
            job_id=JOB, generation=generation, producer="s", node_id=node, seq=seq, rank_columns=RankColumns.of(rows)
        )
    return NodeHeartbeat(job_id=JOB, generation=generation, producer="s", node_id=node, seq=seq, ranks=rows)


def exit_(node: str, rank: int | None, generation: int = 0, **kw) -> WorkerExit:
    return WorkerExit(job_id=JOB, generation=generation, producer="s", node_id=node, rank=rank, pid=5, signal=9, **kw)


@pytest.mark.parametrize(
    "event, why",
    [
        (beat("ghost", 1), "node 'ghost' is not in"),
        (beat("node-0", 1, generation=10**6), "generation 1000000 is ahead"),
        (beat("node-0", 1, rank_gen=10**6), "ahead"),
        (beat("node-0", 1, ranks=(0, 10**9)), "rank 1000000000 is not in"),
        (beat("node-0", 1, ranks=(0, -1), columns=True), "rank -1 is not in"),
        (exit_("node-0", 10**9), "rank 1000000000"),
        (exit_("node-0", 0, generation=7), "ahead"),
        (exit_("nowhere", 0), "not in the job's topology"),
        (LogEvent(job_id=JOB, generation=0, producer="s", node_id="node-1", rank=4, line="x"), "rank 4"),
        (exit_("node-0", 0).model_copy(update={"job_id": "other"}), "not this detector's job"),
    ],
)
def test_untrusted_worker_events_are_refused_with_a_reason(event, why) -> None:
    reason = core.admit(event, TOPO)
    assert reason is not None and why in reason, reason


@pytest.mark.parametrize(
    "event",
    [
        beat("node-0", 1),
        beat("node-1", 1, ranks=(2, 3), columns=True),
        beat("spare-0", 1, ranks=(None, None)),  # standbys have no rank yet
        exit_("node-0", 1),
        exit_("node-0", None),
        beat("node-0", 1, generation=0, rank_gen=0),
    ],
)
def test_events_of_the_topology_are_admitted(event) -> None:
    assert core.admit(event, TOPO) is None
    assert core.admit(event, None) is None  # no registry view: nothing to check against


@dataclass
class Rec:
    topic: str = "hb"
    partition: int = 0
    offset: int = 0
    key: bytes | None = b"node-0"
    value: bytes | None = b"{}"
    timestamp: int = 0


class FakeProducer:
    def __init__(self) -> None:
        self.letters: list[str] = []
        self.published: list = []

    async def dead_letter(self, record, reason: str, consumer: str) -> bool:
        self.letters.append(reason)
        return True

    async def publish(self, event, wait: bool = False) -> None:
        self.published.append(event)


async def test_one_forged_generation_does_not_blind_the_detector() -> None:
    """The issue's run: a forged heartbeat with generation 10^6 (a real node, and a node that
    does not exist), then a real crash: it must be detected, and no incident names the ghost."""
    svc = DetectorService(Settings(job_id=JOB), instance="t")
    fake = FakeProducer()
    svc._producer = fake
    svc.topology = TOPO
    t0 = 1000.0
    svc.clock = lambda: t0
    for seq in (1, 2):
        await svc._handle_batch([(beat("node-0", seq), Rec()), (beat("node-1", seq, ranks=(2, 3)), Rec(key=b"node-1"))])
    await svc._handle_batch(
        [
            (beat("node-0", 3, generation=10**6, rank_gen=10**6), Rec()),
            (beat("ghost", 1, generation=10**6, ranks=(10**9,)), Rec(key=b"ghost")),
            (exit_("ghost", 10**9, generation=10**6), Rec(key=b"ghost")),
        ]
    )
    assert len(fake.letters) == 3 and all(r.startswith("untrusted: ") for r in fake.letters)
    assert svc.refused == 3 and svc.state.counters["untrusted_events"] == 3
    assert fake.published == []
    await svc._handle_batch([(exit_("node-1", 3), Rec(key=b"node-1"))])
    incidents = [e for e in fake.published if getattr(e, "kind", None) == "fault_incident"]
    assert len(incidents) == 1
    assert incidents[0].fault_class is FaultClass.PROCESS_CRASH and incidents[0].root_cause_nodes == ("node-1",)
    assert incidents[0].generation == 0
