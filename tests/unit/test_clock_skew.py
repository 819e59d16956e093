"""A node whose wall clock is minutes off (issue #16 item 7): the detector judges liveness,
progress and fault times by its own clock at receipt and the sidecars' monotonic deltas
(`since_progress_s`), never by the senders' `emitted_at`, so the skew makes no false incident
and no wrong detection latency."""

from __future__ import annotations

import pytest
from test_detector_core import JOB, Sim

from flashrecovery.shared.schemas import FaultClass, WorkerExit

pytestmark = pytest.mark.unit

SKEW_S = {"n1": 300.0, "n2": -300.0}  # n1 five minutes ahead, n2 five minutes behind


class SkewedSim(Sim):
    def feed(self, event, now: float):
        skew = SKEW_S.get(getattr(event, "node_id", ""), 0.0)
        return super().feed(event.model_copy(update={"emitted_at": now + skew}), now)


def test_skewed_clocks_make_no_false_incident_and_no_wrong_latency() -> None:
    sim = SkewedSim(nodes=4, ranks=2)
    sim.run(0.0, 30.0)
    assert sim.incidents() == []
    for node, rank in (("n1", 2), ("n2", 5)):
        before = len(sim.incidents())
        sim.feed(
            WorkerExit(
                job_id=JOB,
                generation=sim.generation,
                producer="sidecar",
                node_id=node,
                rank=rank,
                pid=1000 + rank,
                signal=9,
                step=sim.step,
            ),
            30.2,
        )
        sim.tick(30.3)
        new = sim.incidents()[before:]
        assert [i.fault_class for i in new] == [FaultClass.PROCESS_CRASH]
        inc = new[0]
        assert inc.root_cause_nodes == (node,)
        # Fault time and detection are the detector's receipt times: 0 <= latency < 1 s, not +-300 s.
        assert 30.0 <= inc.first_seen_at <= inc.detected_at <= 30.3
        sim.generation += 1  # the recovery of the first fault moved the job on
