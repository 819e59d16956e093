"""End-to-end recovery through the real services: broker, Redis, detector, planner, two
executors, sidecars and real torch workers (4 nodes x 2 ranks, dp=4 x tp=2, plus a spare node
with standbys). Each scenario's final parameters and optimizer state must be bitwise equal to a
fault-free run of the same job, with no committed step lost and the survivors' processes kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from flashrecovery.agent.compute import CUT
from flashrecovery.cluster import LocalCluster, states_equal
from flashrecovery.demo import committed_steps_lost_observed, reference_cluster
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.settings import BusSettings, Settings

STEPS = 16
AT = 5
# Faults are injected once a heartbeat (1 Hz) shows rank r at step AT: on a quiet machine the
# bare job runs its 16 steps in ~1.5 s and would be done before that. The sleep in each step
# does not change the math, so every run (and the reference) stays bitwise comparable.
STEP_SLEEP_S = 0.3
pytestmark = pytest.mark.timeout(900)  # the first test also pays for the reference run


def _cluster(
    stack, tmp: Path, fault_env: str | None = None, job_args: str = "", signing_key_file: Path | None = None
) -> LocalCluster:
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        job_id=job,
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        bus=BusSettings(
            topic_namespace=job,
            telemetry_partitions=2,
            linger_ms=2,
            signing_key_file=str(signing_key_file) if signing_key_file else None,
        ),
    )
    return reference_cluster(settings, tmp / job, STEPS, f"--step-sleep {STEP_SLEEP_S} {job_args}", fault_env=fault_env)


@pytest.fixture(scope="module")
def reference_states(fault_free_states):
    """One fault-free run of the job through the same services (shared with test_scenarios)."""
    return fault_free_states(STEPS, f"--step-sleep {STEP_SLEEP_S}")


async def _recover(c: LocalCluster, fault: str, rank: int, during=None, before=None) -> dict:
    """Run the job with one fault (and optionally an action before it, once training started,
    and one during recovery); return what the checks need."""
    await c.start()
    await c.wait_until(lambda: c.min_step() >= 1, 300, "training to start")
    if before is not None:
        await before(c)
    pids = {r: s.pid for r, (_, s) in c.timeline.rank_view().items()}
    fault_at = await c.inject(fault, rank, AT)
    if during is not None:
        await during(c)
    await c.wait_until(lambda: any(x.outcome == "done" for x in c.timeline.completed), 300, "recovery")
    await c.wait_until(c.finished, 300, "training to finish")
    done = [x for x in c.timeline.completed if x.outcome == "done"]
    plans = {p.plan_id: p for p in c.timeline.plans}
    restarted = set().union(*(plans[d.plan_id].restart_ranks for d in done))
    return {
        "states": c.final_states(),
        "pids": pids,
        "restarted": restarted,
        "done": done,
        "lost_observed": committed_steps_lost_observed(c.timeline, fault_at, done[-1].recovery_step),
        "completed": c.timeline.completed,
        "incidents": c.timeline.incidents,
        "plans": [plans[d.plan_id] for d in done],
    }


def _check(result: dict, reference: dict) -> None:
    ok, why = states_equal(reference, result["states"])
    assert ok, why
    assert all(d.committed_steps_lost == 0 for d in result["done"])
    assert result["lost_observed"] == 0  # heartbeats before the fault vs the resume step
    for r, pid in result["pids"].items():
        if r not in result["restarted"]:
            assert result["states"][r]["pid"] == pid, f"survivor rank {r} changed process"


def _recover_on_new_cluster(
    stack,
    tmp: Path,
    fault: str,
    rank: int,
    fault_env: str | None = None,
    during=None,
    job_args: str = "",
    signing_key_file: Path | None = None,
    before=None,
) -> dict:
    """A fresh cluster, one fault, its recovery awaited; the cluster is stopped whatever happens."""

    async def go():
        c = _cluster(stack, tmp, fault_env, job_args, signing_key_file)
        try:
            return await _recover(c, fault, rank, during=during, before=before)
        finally:
            await c.stop()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "fault, rank, restarted",
    [
        # A process crash: test_crash_restarted_in_place_from_the_nodes_warm_standby (the
        # defaults). A hang: test_hang_recovers_with_reports_decided_by_the_executor.
        ("node-crash", 5, {4, 5}),
        # only the sidecar dies: its ranks die with it (parent-death signal) and the silent node
        # is handled as lost (issue #16 item 6: a sidecar that cannot re-attach)
        ("sidecar-crash", 3, {2, 3}),
    ],
)
def test_fault_recovers_bitwise(stack, tmp_path, reference_states, fault, rank, restarted):
    result = _recover_on_new_cluster(stack, tmp_path, fault, rank)
    assert result["restarted"] == restarted
    _check(result, reference_states)
    if fault == "sidecar-crash":
        lost = [i for i in result["incidents"] if i.fault_class == "node_lost"]
        assert lost and lost[0].root_cause_nodes == ("node-1",), [i.reason for i in result["incidents"]]


# A fault the agent injects inside one phase of step AT, and where training must resume: a step
# is committed once its vote completed anywhere (docs/commit-protocol.md). The survivors decide
# it in-band (the default): kill-optimizer needs the lagging survivors to apply AT in the
# recovery, kill-grad-sync leaves some survivors holding AT's gradients and others not. A kill
# in the forward or after the sync, or a Python exception after it (the process exits), decide
# as kill-grad-sync does (nothing voted); `flashrecovery demo --fault <kind>` runs them.
PHASE_FAULTS = {
    "kill-grad-sync": {AT},
    "kill-optimizer": {AT + 1},  # the victim completed vote AT: step AT is committed
}


@pytest.mark.parametrize("fault", sorted(PHASE_FAULTS))
def test_fault_inside_a_step_phase_resumes_at_the_committed_step(stack, tmp_path, reference_states, fault):
    result = _recover_on_new_cluster(stack, tmp_path, fault, 5, LocalCluster.fault_env_for(fault, 5, AT))
    assert result["restarted"] == {5}
    done = result["done"][0]
    assert done.recovery_step in PHASE_FAULTS[fault], done.reason
    assert done.reason.startswith("in-band"), f"the survivors did not decide the commit: {done.reason}"
    _check(result, reference_states)


SLOW_S = 30.0


def test_a_pause_cuts_a_survivors_compute_short(stack, tmp_path, reference_states):
    """Rank 5 dies as step AT begins while rank 2 is inside a 30-s compute of the same step
    (--slow-step, inside `agent.compute()`): the pause ends rank 2's compute at once instead of
    after it (agent/compute.py). Rank 2 keeps its process, no committed step is lost, and the
    state is bitwise equal to the fault-free run. Without the cut rank 2 would answer the pause
    only after its 30 s, past the executor's pause deadline: it would be declared hung and
    replaced as well, and its log would not say its compute was cut."""
    result = _recover_on_new_cluster(
        stack,
        tmp_path,
        "kill-forward",
        5,
        LocalCluster.fault_env_for("kill-forward", 5, AT),
        job_args=f"--slow-step {AT}:{SLOW_S}:2",
    )
    assert result["restarted"] == {5}
    _check(result, reference_states)
    rank2 = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("rank2.log"))
    paused = [line for line in rank2.splitlines() if "paused" in line and "why" in line]
    assert any(CUT in line for line in paused), paused


def test_hang_recovers_with_reports_decided_by_the_executor(stack, tmp_path, reference_states, monkeypatch):
    """The other commit path (executor in_band_commit off): every node reports its ranks' pause
    counters, here as columns (sidecar rank_columns: heartbeats and acks), and the executor's
    commit rule decides from them; the detector judges the frozen rank from the columns."""
    monkeypatch.setenv("FLASHRECOVERY_SIDECAR__RANK_COLUMNS", "1")
    monkeypatch.setenv("FLASHRECOVERY_EXECUTOR__IN_BAND_COMMIT", "false")

    result = _recover_on_new_cluster(stack, tmp_path, "hang", 6)
    done = result["done"][0]
    assert result["restarted"] == {6} and done.fault_class == "hang"
    assert not done.reason.startswith("in-band"), done.reason
    _check(result, reference_states)


def test_ecc_log_line_replaces_the_whole_node(stack, tmp_path, reference_states):
    result = _recover_on_new_cluster(stack, tmp_path, "ecc", 3, LocalCluster.fault_env_for("ecc", 3, AT))
    assert result["restarted"] == {2, 3}
    assert result["done"][0].fault_class == "hardware"
    _check(result, reference_states)


async def _when_phase(c: LocalCluster, phase: str) -> None:
    await c.wait_until(
        lambda: any(p.phase == phase and str(p.status) == "started" for p in c.timeline.progress), 120, f"phase {phase}"
    )


def _standby_pids(c: LocalCluster, node: str) -> set[int]:
    hb = c.timeline.heartbeats.get(node)
    return {r.pid for r in hb.rank_statuses() if r.rank is None} if hb else set()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _parent(pid: int) -> tuple[int, str]:
    """A process's parent: its PID and command line."""
    ppid = _ppid(pid)
    return ppid, _cmdline(ppid)


def test_crash_restarted_in_place_from_the_nodes_warm_standby(stack, tmp_path, reference_states):
    """Issue #14 item 1, the defaults: a process crash restarts the rank on its own node, and the
    process that becomes the rank is the node's warm standby, started before the fault (torch
    imported), not a cold start; the spare's standbys are left for node losses. The ranks
    themselves were forked at the start by their node's zygote (sidecar.rank_fork)."""
    warm: set[int] = set()
    parents: dict[int, tuple[int, str]] = {}

    async def standby_started(c: LocalCluster):
        await c.wait_until(lambda: bool(_standby_pids(c, "node-1")), 120, "node-1's warm standby")
        warm.update(_standby_pids(c, "node-1"))
        parents.update({r: _parent(s.pid) for r, (_, s) in c.timeline.rank_view().items()})

    result = _recover_on_new_cluster(stack, tmp_path, "process-crash", 2, before=standby_started)
    assert result["restarted"] == {2}
    [plan] = result["plans"]
    assert [(r.from_node, r.to_node, r.mode) for r in plan.replacements] == [("node-1", "node-1", "in_place")]
    assert result["states"][2]["pid"] in warm, "the rank was not restarted from the node's warm standby"
    assert len(parents) == 8 and all("flashrecovery.sidecar.zygote" in cmd for _, cmd in parents.values()), parents
    assert len({ppid for ppid, _ in parents.values()}) == 4, f"one zygote per node: {parents}"
    _check(result, reference_states)


async def _recovered_and_finished(c: LocalCluster, pids: dict[int, int]) -> dict:
    """Wait for a completed recovery and the job's end; what the checks need."""
    await c.wait_until(lambda: any(x.outcome == "done" for x in c.timeline.completed), 300, "recovery")
    await c.wait_until(c.finished, 300, "training to finish")
    done = [x for x in c.timeline.completed if x.outcome == "done"]
    plans = {p.plan_id: p for p in c.timeline.plans}
    return {
        "states": c.final_states(),
        "pids": pids,
        "restarted": set().union(*(plans[d.plan_id].restart_ranks for d in done)),
        "done": done,
        "incidents": c.timeline.incidents,
        "exits": [(e.rank, e.expected) for e in c.timeline.exits if e.rank is not None],
    }


def _zygote_of(c: LocalCluster, node: str) -> int:
    """The PID of `node`'s zygote: the sidecar's child running flashrecovery.sidecar.zygote."""
    sidecar = c.sup.procs[f"sidecar-{node}"].pid
    for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()):
        try:
            if _ppid(pid) == sidecar and "flashrecovery.sidecar.zygote" in _cmdline(pid):
                return pid
        except (OSError, ValueError, IndexError):
            continue  # ended while looked at
    raise AssertionError(f"{node} has no zygote")


def test_a_dead_zygote_takes_its_forked_ranks_and_they_are_recovered(stack, tmp_path, reference_states):
    """The ranks are forked by their node's zygote (sidecar.rank_fork) and die with it: a zygote
    SIGKILLed mid-training takes node-1's two ranks and its warm standby. The sidecar reports
    both ranks dead, they are restarted (no zygote left: new interpreters or the spare), the
    survivors keep their processes and the job ends bitwise equal to the fault-free run."""

    async def go():
        c = _cluster(stack, tmp_path)
        try:
            await c.start()
            await c.wait_until(lambda: c.min_step() >= 1, 300, "training to start")
            pids = {r: s.pid for r, (_, s) in c.timeline.rank_view().items()}
            zygote = _zygote_of(c, "node-1")
            await c.wait_until(lambda: c.rank_status(2)[1].step >= AT, 120, f"rank 2 at step {AT}")
            os.kill(zygote, signal.SIGKILL)
            return await _recovered_and_finished(c, pids)
        finally:
            await c.stop()

    result = asyncio.run(go())
    assert {r for r, expected in result["exits"] if not expected} == {2, 3}, result["exits"]
    assert result["restarted"] == {2, 3}
    assert all(d.committed_steps_lost == 0 for d in result["done"])
    ok, why = states_equal(reference_states, result["states"])
    assert ok, why
    for r, pid in result["pids"].items():
        if r not in (2, 3):
            assert result["states"][r]["pid"] == pid, f"survivor rank {r} changed process"


def test_crash_restarted_in_place_cold_start(stack, tmp_path, reference_states, monkeypatch):
    """Planner policy restart-in-place with no warm standby on the node (sidecar standbys 0):
    the crashed rank's own node starts a new process. The replace must complete on its first
    attempt: a standby's hello has to wake the waiting replace even though every other worker
    is paused and silent."""
    monkeypatch.setenv("FLASHRECOVERY_PLANNER__RESTART_IN_PLACE_FOR_SOFTWARE", "true")
    monkeypatch.setenv("FLASHRECOVERY_SIDECAR__STANDBYS", "0")
    timeout = Settings().executor.phase_timeout_s

    result = _recover_on_new_cluster(stack, tmp_path, "process-crash", 2)
    assert result["restarted"] == {2}
    assert [(r.from_node, r.to_node) for r in result["plans"][0].replacements] == [("node-1", "node-1")]
    done = result["done"][0]
    assert done.phase_seconds["replace"] < timeout, "replace needed a retry after the phase timeout"
    _check(result, reference_states)


def test_survivor_hung_during_the_pause_is_killed_and_replaced(stack, tmp_path, reference_states, monkeypatch):
    """Issue #12 item 3: a crash, and at once a survivor on another node stopped by the OS, so
    it cannot answer the pause. Its sidecar reports it hung at the pause deadline, the detector
    raises a hang naming it, the superseding plan kills it by PID and restarts it with the
    crashed rank; the job ends bitwise equal to the fault-free run."""
    monkeypatch.setenv("FLASHRECOVERY_SIDECAR__PAUSE_TIMEOUT_S", "5")

    async def stop_a_survivor(c: LocalCluster):
        _, status = c.rank_status(6)
        os.kill(status.pid, signal.SIGSTOP)

    result = _recover_on_new_cluster(stack, tmp_path, "process-crash", 2, during=stop_a_survivor)
    hangs = [i for i in result["incidents"] if i.fault_class == "hang"]
    assert [i.root_cause_ranks for i in hangs] == [(6,)], [i.reason for i in result["incidents"]]
    assert "did not answer the pause" in hangs[0].reason
    assert result["restarted"] == {2, 6}
    assert result["plans"][-1].supersedes is not None
    _check(result, reference_states)


def test_rank_stopped_in_its_first_step_is_found_and_restarted(stack, tmp_path, reference_states, monkeypatch):
    """Nothing committed yet, so every rank is still `starting`: the agent declares its first
    step as a long phase (first_step_s, 2 s here), and a rank the OS stops inside it is a hang
    once the 5 s floor plus those 2 s have passed, restarted from a replica that holds the
    initial state; the job ends bitwise equal to the fault-free run. Without the declaration
    nothing judges a starting rank and the job waits for the collective timeout (300 s)."""
    monkeypatch.setenv("FLASHRECOVERY_AGENT_FIRST_STEP_S", "2")

    async def go():
        c = _cluster(stack, tmp_path, "kind=hang,rank=6,step=1,phase=forward")
        try:
            await c.start()
            await c.wait_until(lambda: len(c.timeline.rank_view()) == c.world, 300, "every rank's first heartbeat")
            pids = {r: s.pid for r, (_, s) in c.timeline.rank_view().items()}
            return await _recovered_and_finished(c, pids)
        finally:
            await c.stop()

    result = asyncio.run(go())
    hangs = [i for i in result["incidents"] if i.fault_class == "hang"]
    assert [i.root_cause_ranks for i in hangs] == [(6,)], [i.reason for i in result["incidents"]]
    assert "first_step" in hangs[0].reason, hangs[0].reason
    assert result["restarted"] == {6}
    assert result["done"][0].recovery_step == 1, result["done"][0].reason  # nothing was committed
    ok, why = states_equal(reference_states, result["states"])
    assert ok, why
    for r, pid in result["pids"].items():
        if r != 6:
            assert result["states"][r]["pid"] == pid, f"survivor rank {r} changed process"


def test_executor_leader_stopped_mid_recovery_is_fenced_when_it_wakes(stack, tmp_path, reference_states):
    """The leader is SIGSTOPped in the middle of a replace; the standby takes the lease (a new
    fence token) and continues the plan; the old leader is woken while the standby drives and
    must do nothing: no command, no write, no completion."""
    seen: dict = {}

    async def stop_leader(c: LocalCluster):
        await _when_phase(c, "replace")
        reg = Registry.from_url(c.settings.redis_url, c.settings.job_id)
        try:
            seen["leader"] = leader = await reg.lease_holder("executor")
        finally:
            await reg.close()
        proc = c.sup.procs[f"executor-{leader}"]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            other = f"executor-{1 - int(leader)}"
            await c.wait_until(
                lambda: any(p.producer == other for p in c.timeline.progress),
                60,
                "the standby executor to continue the plan",
            )
        finally:
            seen["woke_at"] = time.time()
            os.kill(proc.pid, signal.SIGCONT)

    result = _recover_on_new_cluster(stack, tmp_path, "process-crash", 4, during=stop_leader)
    deposed = f"executor-{seen['leader']}"
    assert [d.producer for d in result["completed"]] != [] and all(
        d.producer != deposed for d in result["completed"]
    ), "the deposed leader finished a plan"
    assert len(result["done"]) == 1 and result["restarted"] == {4}
    _check(result, reference_states)
    lines = [
        json.loads(line)
        for line in next(tmp_path.glob(f"e2e-*/{deposed}.log")).read_text().splitlines()
        if line.startswith("{")
    ]
    awake = [e["event"] for e in lines if datetime.fromisoformat(e["timestamp"]).timestamp() >= seen["woke_at"]]
    # Awake again, it only learns it lost the lease: not one more step, write or command (a
    # refused transition would still be an attempt to act on a plan it no longer owns).
    assert "drive_stopped" in awake or "fenced_out" in awake, awake
    assert set(awake) <= {"leadership", "drive_stopped", "fenced_out", "ready"}, awake
