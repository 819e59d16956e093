"""Failure-free overhead, three variants of the same model and shape, interleaved runs:
- ours: the reference job with agent + sidecars + services (the full local deployment);
- agent only: the reference job with the agent, under torchrun, no sidecar, no service
  (bench/agent_only.py): the agent's own per-step cost;
- bare: the plain loop (bench/baseline_train.py: torch.distributed gloo groups, no agent, no
  checkpoints).
Both torchrun variants run at the niceness the sidecars give our workers, so only the code
differs between agent only and bare. Every variant is timed the same way: rank 0's progress log,
the least-squares slope over the steady window (steady_window), and the cores each process
family used in that window (bench/cpu_share.py)."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from flashrecovery.demo import reference_cluster
from flashrecovery.shared.settings import BusSettings, Settings

from .baseline import NPROC, TP, _read, step_sleep_args, torchrun_argv
from .cpu_share import CpuWindow
from .stats import ratio, slope, summarize

WORKER_NICE = int(os.environ.get("FLASHRECOVERY_SIDECAR__WORKER_NICE", "10"))


def _agent_only_argv(run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [
        torchrun,
        "--standalone",
        f"--nproc-per-node={NPROC}",
        "--max-restarts=0",
        "-m",
        "flashrecovery.bench.agent_only",
        "--steps",
        str(steps),
        "--tp",
        str(TP),
        "--progress",
        str(run_dir / "progress.log"),
        *extra,
    ]


def steady_window(steps: int) -> tuple[int, int]:
    """The steps every variant is timed over: the first fifth (process start, gloo warm-up, our
    standbys importing torch) and the last step are left out."""
    return max(2, steps // 5), steps - 1


def progress_steps(path: Path) -> list[tuple[int, float]]:
    """(step, wall time) rows of a progress log ('<attempt> <step> <time>' per committed step)."""
    return [(int(s), float(t)) for _, s, t in _read(path)] if path.exists() else []


def s_per_step(rows: list[tuple[int, float]], steps: int) -> dict[str, Any]:
    lo, hi = steady_window(steps)
    win = [(s, t) for s, t in rows if lo <= s <= hi]
    sec = slope([s for s, _ in win], [t for _, t in win])
    return {"s_per_step": round(sec, 4) if sec else None, "samples": len(win)}


class _Watch:
    """Starts a CPU window when the progress log reaches the steady window, ends it near its end."""

    def __init__(self, progress: Path, steps: int, root: int | None, root_label: str) -> None:
        self.progress, self.steps = progress, steps
        self.window = CpuWindow(root, root_label)
        self.lo, self.hi = steady_window(steps)
        self.cores: dict[str, float] | None = None
        self._started = False

    def poll(self) -> None:
        rows = progress_steps(self.progress)
        last = rows[-1][0] if rows else -1
        if not self._started and last >= self.lo:
            self.window.start()
            self._started = True
        elif self._started and self.cores is None and last >= self.hi - 1:
            self.cores = self.window.end()


def step_time_torchrun(run_dir: Path, steps: int, timeout_s: float, agent: bool, extra: list[str]) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = (
        _agent_only_argv(run_dir, steps, extra)
        if agent
        else torchrun_argv(run_dir, steps, 0, max_restarts=0, extra=extra)
    )
    with (run_dir / "torchrun.log").open("wb") as log:
        proc = subprocess.Popen(["nice", "-n", str(WORKER_NICE), *argv], stdout=log, stderr=subprocess.STDOUT)
        watch = _Watch(run_dir / "progress.log", steps, proc.pid, "torchrun")
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise subprocess.TimeoutExpired(argv, timeout_s)
            watch.poll()
            time.sleep(0.05)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv)
    return {**s_per_step(progress_steps(run_dir / "progress.log"), steps), "cpu_cores": watch.cores}


async def step_time_ours(
    steps: int, run_root: Path, base: Settings, timeout_s: float, extra: list[str]
) -> dict[str, Any]:
    """The reference job with agent + sidecars + services (a LocalCluster, fault-free), timed
    from rank 0's progress log like the torchrun variants."""
    job = f"overhead-{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(
        update={
            "job_id": job,
            "bus": BusSettings(topic_namespace=job, telemetry_partitions=2, control_partitions=1, linger_ms=2),
        }
    )
    progress = run_root / job / "progress.log"
    cluster = reference_cluster(settings, run_root / job, steps, shlex.join(["--progress", str(progress), *extra]))
    watch = _Watch(progress, steps, None, "benchmark driver (cluster owner)")
    try:
        await cluster.start()
        deadline = time.monotonic() + timeout_s
        while not cluster.finished() and time.monotonic() < deadline:
            watch.poll()
            await asyncio.sleep(0.05)
    finally:
        await cluster.stop()
    return {**s_per_step(progress_steps(progress), steps), "job": job, "cpu_cores": watch.cores}


def _median_cores(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per family, the median over runs of the cores it used in the steady window."""
    names = {k for r in runs for k in (r.get("cpu_cores") or {})}
    out = {}
    for k in names:
        vals = sorted((r.get("cpu_cores") or {}).get(k, 0.0) for r in runs if r.get("cpu_cores"))
        if vals:
            out[k] = vals[len(vals) // 2]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


async def run_overhead(
    reps: int, steps: int, run_root: Path, settings: Settings, timeout_s: float, log=print, step_sleep: float = 0.0
) -> dict[str, Any]:
    extra = step_sleep_args(step_sleep)
    ours, agent_only, bare = [], [], []
    for i in range(reps):  # interleaved: the load drifts less between the variants of one round
        log(f"overhead: agent+sidecar+services run {i + 1}/{reps}")
        ours.append(await step_time_ours(steps, run_root, settings, timeout_s, extra))
        log(f"overhead: agent only (torchrun, no sidecar) run {i + 1}/{reps}")
        agent_only.append(step_time_torchrun(run_root / f"agent-{i}-{int(time.time())}", steps, timeout_s, True, extra))
        log(f"overhead: bare loop run {i + 1}/{reps}")
        bare.append(step_time_torchrun(run_root / f"bare-{i}-{int(time.time())}", steps, timeout_s, False, extra))
    o = summarize(r["s_per_step"] for r in ours)
    a = summarize(r["s_per_step"] for r in agent_only)
    b = summarize(r["s_per_step"] for r in bare)
    lo, hi = steady_window(steps)
    return {
        "steps": steps,
        "timed_steps": [lo, hi],
        "step_sleep_s": step_sleep,
        "reps": reps,
        "worker_nice": WORKER_NICE,
        "ours": ours,
        "agent_only": agent_only,
        "bare": bare,
        "ours_s_per_step": o,
        "agent_only_s_per_step": a,
        "bare_s_per_step": b,
        "ratio": ratio(o["median"], b["median"], 3),
        "agent_only_ratio": ratio(a["median"], b["median"], 3),
        "deployment_ratio": ratio(o["median"], a["median"], 3),
        "cpu_cores_median": {
            "ours": _median_cores(ours),
            "agent_only": _median_cores(agent_only),
            "bare": _median_cores(bare),
        },
    }
