"""False-positive check of the detector on the real job: ~40 s of fault-free training through
the real services, with a declared long phase on every rank and a deliberately slow step on one
rank, must raise no incident.

Both irregularities are sized against the detector's hang rule, max(hang_k x p99 step, 5 s
floor), here with hang_k 3 (FLASHRECOVERY_DETECTOR__HANG_K) so that the rule is tight:
- the long phase (15 s of "eval" after step 12, declared with 22.5 s expected) comes first, while
  the p99 is that of ~12 ordinary steps (well under 5 s even on a loaded box, first step
  included), so 15 s is past the threshold and only the declaration keeps it from being a hang:
  if the detector ignored declarations this test would see a hang incident. (Placed after the
  slow step, as it once was, the slow step's 4 s would sit in the p99 and lift the threshold
  over the phase: the check could not fail.)
- the slow step (4 s on rank 3; its peers wait for it in the gradient allreduce) is ~8x the
  step time of this job, yet under the floor.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from flashrecovery.demo import reference_cluster

STEPS = 45
STEP_SLEEP_S = 0.5  # the 10-minute fault-free soak at 4 Hz heartbeats: bench/soak.py
LONG = (12, 15.0)  # after step, seconds
SLOW = (30, 4.0, 3)  # step, seconds, rank
HANG_K = "3"
pytestmark = pytest.mark.timeout(900)


def test_fault_free_training_with_a_long_phase_and_a_slow_step_raises_no_incident(
    new_job_settings, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLASHRECOVERY_DETECTOR__HANG_K", HANG_K)
    settings = new_job_settings("fp")
    job = settings.job_id
    worker_args = (
        f"--step-sleep {STEP_SLEEP_S} --slow-step {SLOW[0]}:{SLOW[1]}:{SLOW[2]} --long-phase {LONG[0]}:{LONG[1]}"
    )
    seen: dict[str, float] = {}

    def saw_long_phase() -> bool:
        if any(st.long_phase == "eval" for _, st in c.timeline.rank_view().values()):
            seen.setdefault("long_phase", time.monotonic())
        return "long_phase" in seen

    async def go() -> float:
        t0 = time.monotonic()
        await c.start()
        # proof that the declaration really reached the detector's input
        await c.wait_until(saw_long_phase, 600, "the declared long phase to be reported")
        await c.wait_until(c.finished, 600, "the fault-free run to finish")
        await asyncio.sleep(2.0)  # an incident about the last seconds would still arrive
        return time.monotonic() - t0

    c = reference_cluster(settings, tmp_path / job, STEPS, worker_args)

    async def run() -> float:
        try:
            return await go()
        finally:
            await c.stop()

    wall = asyncio.run(run())
    assert wall >= 40, f"the run lasted only {wall:.0f} s"
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / job).rglob("rank*.log"))
    assert f"slow step {SLOW[0]}: {SLOW[1]} s extra on rank {SLOW[2]}" in logs
    assert f"long phase eval after step {LONG[0]}" in logs
    assert not c.timeline.incidents, (
        f"{len(c.timeline.incidents)} false incident(s); first: {c.timeline.incidents[0].reason}"
    )
    assert not c.timeline.plans
