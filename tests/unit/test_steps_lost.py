"""#12 item 11: committed steps lost, measured from heartbeats the watcher saw before the fault,
against the step the recovery resumed from. It must be able to say "lost"."""

from __future__ import annotations

from flashrecovery.cluster import Timeline
from flashrecovery.demo import committed_steps_lost_observed
from flashrecovery.shared.schemas import NodeHeartbeat, RankState, RankStatus


def _hb(node: str, seq: int, steps: dict[int, int]) -> NodeHeartbeat:
    return NodeHeartbeat(
        job_id="j",
        generation=0,
        producer="sidecar",
        node_id=node,
        seq=seq,
        interval_s=1.0,
        ranks=tuple(
            RankStatus(rank=r, local_rank=i, pid=100 + r, state=RankState.RUNNING, step=s)
            for i, (r, s) in enumerate(steps.items())
        ),
    )


def test_committed_before_is_the_step_every_rank_had_applied() -> None:
    tl = Timeline()
    tl.note_steps(_hb("a", 0, {0: 4, 1: 4}), at=10.0)
    tl.note_steps(_hb("b", 0, {2: 3, 3: 4}), at=10.1)
    tl.note_steps(_hb("b", 1, {2: 5, 3: 5}), at=11.0)
    tl.note_steps(_hb("a", 1, {0: 5, 1: 5}), at=11.1)
    assert tl.committed_before(10.5) == 3
    assert tl.committed_before(11.05) == 4
    assert tl.committed_before(12.0) == 5
    assert tl.committed_before(0.0) == 0


def test_lost_steps_are_counted_when_the_recovery_resumes_too_early() -> None:
    tl = Timeline()
    tl.note_steps(_hb("a", 0, {0: 9, 1: 9}), at=1.0)
    assert committed_steps_lost_observed(tl, fault_at=2.0, resume_step=10) == 0
    assert committed_steps_lost_observed(tl, fault_at=2.0, resume_step=7) == 3  # resumed from 6
    assert committed_steps_lost_observed(tl, fault_at=2.0, resume_step=None) is None
