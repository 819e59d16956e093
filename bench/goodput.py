"""Goodput under repeated faults: a run of `duration_s` with a worker SIGKILLed every ~`gap_s`
(uniform +-30%), ours against the torchrun baseline and TorchFT (same seeded fault times; ours and
TorchFT also the same victim ranks). Goodput = net committed steps x the
system's own fault-free seconds per step / wall time; net steps per second is also reported.

Ours restarts a crashed process in place (planner policy restart_in_place_for_software, the
default) from the node's warm standby (sidecar standbys, default 1; until issue #14 item 1 this
was a cold start while the job waited), so a run absorbs any number of faults without running out
of spare nodes. Node quarantine is off for this run: the faults are injected SIGKILLs, not a bad
node."""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from flashrecovery.demo import reference_cluster
from flashrecovery.shared.settings import BusSettings, Settings

from .baseline import NPROC, _read, step_sleep_args, stop_torchrun, torchrun_argv
from .stats import summarize

BIG = 100_000


def _fault_times(duration_s: float, gap_s: float, rng: random.Random) -> list[float]:
    out, t = [], 0.0
    while True:
        t += gap_s * rng.uniform(0.7, 1.3)
        if t >= duration_s - 5:
            return out
        out.append(t)


async def goodput_ours(
    duration_s: float,
    gap_s: float,
    s_per_step: float | None,
    run_root: Path,
    base: Settings,
    seed: int = 7,
    step_sleep: float = 0.0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    job = f"goodput-{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(
        update={
            "job_id": job,
            "bus": BusSettings(topic_namespace=job, telemetry_partitions=2, control_partitions=1, linger_ms=2),
        }
    )
    # Restart in place (the default; one spare could not absorb ten faults), and no quarantine: these are
    # injected SIGKILLs, not a flapping node (the default quarantines a node at its 2nd fault in
    # an hour, and with no spare capacity left the job would wait for an operator).
    policy = {
        "FLASHRECOVERY_PLANNER__RESTART_IN_PLACE_FOR_SOFTWARE": "true",
        "FLASHRECOVERY_PLANNER__QUARANTINE_FAULTS": "1000000",
    }
    prev = {k: os.environ.get(k) for k in policy}
    os.environ.update(policy)
    cluster = reference_cluster(settings, run_root / job, BIG, shlex.join(step_sleep_args(step_sleep)))
    faults = []
    try:
        await cluster.start()
        await cluster.wait_until(lambda: cluster.min_step() >= 1, 300, "training to start")
        t0, s0 = time.monotonic(), cluster.min_step()
        lead_in = None  # this run's own fault-free steps/s, from +5 s to its first fault
        for i, at in enumerate(_fault_times(duration_s, gap_s, rng)):
            first = i == 0 and at > 10
            if first:
                await asyncio.sleep(max(0.0, t0 + 5 - time.monotonic()))
                ta, sa = time.monotonic(), cluster.min_step()
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if first:
                lead_in = (cluster.min_step() - sa) / (time.monotonic() - ta)
            view = cluster.timeline.rank_view()
            rank = rng.randrange(cluster.world)
            node, st = view.get(rank, (None, None))
            if st is None or st.state != "running":
                faults.append(
                    {
                        "at_s": round(time.monotonic() - t0, 1),
                        "skipped": f"rank {rank} {st.state if st else 'not reported'}",
                    }
                )
                continue
            try:
                os.kill(st.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            faults.append({"at_s": round(time.monotonic() - t0, 1), "rank": rank, "step": st.step})
        await asyncio.sleep(max(0.0, t0 + duration_s - time.monotonic()))
        wall = time.monotonic() - t0
        net = cluster.min_step() - s0
        done = [c for c in cluster.timeline.completed if c.outcome == "done"]
        return {
            "duration_s": round(wall, 1),
            "faults": faults,
            "recoveries_done": len(done),
            "rto_s": [round(d.rto_s, 3) for d in done if d.rto_s is not None],
            "replace_s": [round(d.phase_seconds.get("replace", 0.0), 3) for d in done],
            "pause_s": [round(d.phase_seconds.get("pause", 0.0), 3) for d in done],
            "in_place": sum(
                1
                for p in cluster.timeline.plans
                if p.plan_id in {d.plan_id for d in done} and all(r.mode == "in_place" for r in p.replacements)
            ),
            "net_steps": net,
            "steps_per_s": round(net / wall, 3),
            "goodput": round(net * s_per_step / wall, 3) if s_per_step else None,
            "s_per_step_fault_free": s_per_step,
            # the box's speed drifts between runs: net steps/s over this run's own lead-in rate
            "lead_in_steps_per_s": round(lead_in, 3) if lead_in else None,
            "goodput_vs_lead_in": round(net / wall / lead_in, 3) if lead_in else None,
        }
    finally:
        for k, v in prev.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        await cluster.stop()


def goodput_torchrun(
    duration_s: float,
    gap_s: float,
    ckpt_every: int,
    s_per_step: float | None,
    run_dir: Path,
    seed: int = 7,
    step_sleep: float = 0.0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    faults = _fault_times(duration_s, gap_s, rng)
    restarts = len(faults) + 1
    log = (run_dir / "torchrun.log").open("wb")
    proc = subprocess.Popen(
        torchrun_argv(
            run_dir,
            BIG,
            ckpt_every,
            max_restarts=restarts,
            extra=step_sleep_args(step_sleep),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    progress, pids = run_dir / "progress.log", run_dir / "pids.log"
    done = []
    try:
        deadline = time.monotonic() + 300
        while not _read(progress):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"baseline did not start; see {run_dir / 'torchrun.log'}")
            time.sleep(0.05)
        t0, t0_wall = time.monotonic(), time.time()
        s0 = int(_read(progress)[0][1]) - 1
        for at in faults:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            rows = _read(pids)
            attempt = max(int(r[0]) for r in rows)
            victims = [int(r[2]) for r in rows if int(r[0]) == attempt]
            try:
                os.kill(rng.choice(victims), signal.SIGKILL)
            except ProcessLookupError:
                pass
            done.append({"at_s": round(time.monotonic() - t0, 1), "attempt": attempt})
        time.sleep(max(0.0, t0 + duration_s - time.monotonic()))
        wall = time.monotonic() - t0
        rows = _read(progress)
        last_attempt = max(int(r[0]) for r in rows)
        net = max(int(r[1]) for r in rows if int(r[0]) == last_attempt) - s0
        lead_in = lead_in_rate(rows, t0_wall + 5, t0_wall + (faults[0] if faults else wall))
        return {
            "duration_s": round(wall, 1),
            "ckpt_every": ckpt_every,
            "faults": done,
            "attempts": last_attempt + 1,
            "net_steps": net,
            "steps_per_s": round(net / wall, 3),
            "goodput": round(net * s_per_step / wall, 3) if s_per_step else None,
            "s_per_step_fault_free": s_per_step,
            "lead_in_steps_per_s": round(lead_in, 3) if lead_in else None,
            "goodput_vs_lead_in": round(net / wall / lead_in, 3) if lead_in else None,
            "nproc": NPROC,
        }
    finally:
        stop_torchrun(proc, run_dir, "flashrecovery.bench.baseline_train")
        log.close()


def lead_in_rate(rows: list[list[str]], start_wall: float, end_wall: float) -> float | None:
    """Steps/s of the first attempt between two wall times, from torchrun's progress rows
    ("<attempt> <step> <wall time>"): the run's own fault-free rate, its checkpoints included,
    measured as goodput_ours measures ours (from 5 s after the start to the first fault)."""
    pts = [(float(r[2]), int(r[1])) for r in rows if r[0] == "0" and start_wall <= float(r[2]) <= end_wall]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def goodput_torchft_seeded(
    duration_s: float,
    gap_s: float,
    run_dir: Path,
    ft_timeout_s: float,
    heartbeat_timeout_ms: int,
    seed: int = 7,
    step_sleep: float = 0.0,
) -> dict[str, Any]:
    """TorchFT's goodput run with goodput_ours' fault times and victim ranks (same seed, drawn in
    the same order: every time first, then a rank per fault)."""
    from .torchft_bench import goodput_torchft

    rng = random.Random(seed)
    times = _fault_times(duration_s, gap_s, rng)
    return goodput_torchft(
        duration_s,
        run_dir,
        times,
        lambda world: rng.randrange(world),
        ft_timeout_s=ft_timeout_s,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
        steps=BIG,
        extra=step_sleep_args(step_sleep),
    )


def work_steps(run: dict[str, Any]) -> float:
    """The steps a run trained: torchft's count each step by the share of replica groups that
    trained it (full_width_steps); ours and torchrun's are net committed steps."""
    return run.get("full_width_steps", run["net_steps"])


def against_fault_free(faulty: dict[str, Any], fault_free: dict[str, Any]) -> dict[str, Any]:
    """The faulty run scored against its fault-free twin: the same system and length, no fault,
    run right beside it. Goodput's definition (net steps x fault-free s/step / wall) with the
    fault-free s/step taken over a whole run next to it, not over a lead-in of ~50 s that the
    box's drift moves by as much as five faults cost (docs/benchmarks.md, stop 29)."""
    if fault_free.get("faults"):
        raise ValueError("the fault-free twin had faults injected")
    free_rate = work_steps(fault_free) / fault_free["duration_s"]
    if free_rate <= 0:
        raise ValueError(f"the fault-free twin trained nothing: {fault_free}")
    ratio = work_steps(faulty) / faulty["duration_s"] / free_rate
    twin = ("duration_s", "net_steps", "full_width_steps", "steps_per_s", "lead_in_steps_per_s")
    return {
        **faulty,
        "goodput_vs_fault_free": round(ratio, 3),
        "fault_free_twin": {k: fault_free[k] for k in twin if k in fault_free},
    }


PER_RUN = ("goodput", "faults", "goodput_vs_fault_free", "fault_free_twin", "ran_first")


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's n runs as one entry of the results' layout: goodput, net steps and steps/s
    are the medians (goodput_min / goodput_max the spread), every run kept under "runs"."""
    keys = ("net_steps", "steps_per_s", "duration_s")
    return {
        # what every run shares, from the first; per-run figures only under "runs"
        **{k: v for k, v in runs[0].items() if k not in (*keys, *PER_RUN)},
        **{k: summarize(r[k] for r in runs if r.get(k) is not None)["median"] for k in keys},
        **_spread(runs, "goodput", always=True),
        # against each run's own fault-free rate before its first fault (the box drifts between runs)
        **_spread(runs, "goodput_vs_lead_in", always=True),
        **_spread(runs, "goodput_vs_fault_free"),
        "faults": [f for r in runs for f in r.get("faults", [])],
        "n": len(runs),
        "runs": runs,
    }


def _spread(runs: list[dict[str, Any]], key: str, always: bool = False) -> dict[str, Any]:
    """key's median, min, max (None where no run has it) and per-run values; nothing at all where
    no run has it unless ``always`` (the fault-free twin's ratio exists in paired rounds only)."""
    s = summarize(r.get(key) for r in runs)
    if not s["n"] and not always:
        return {}
    return {key: s["median"], f"{key}_min": s["min"], f"{key}_max": s["max"], f"{key}_runs": [r.get(key) for r in runs]}
