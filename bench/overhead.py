"""Failure-free overhead, three variants of the same model and shape, interleaved runs:
- ours: the reference job with agent + sidecars + services (the full local deployment);
- agent only: the reference job with the agent, under torchrun, no sidecar, no service
  (bench/agent_only.py): the agent's own per-step cost;
- bare: the plain loop (bench/baseline_train.py: torch.distributed gloo groups, no agent, no
  checkpoints).
Both torchrun variants run at the niceness the sidecars give our workers, so only the code
differs between agent only and bare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flashrecovery.shared.settings import Settings

from .baseline import NPROC, TP, _read, torchrun_argv
from .recovery import step_time_ours
from .stats import ratio, slope, summarize

WORKER_NICE = int(os.environ.get("FLASHRECOVERY_SIDECAR__WORKER_NICE", "10"))


def _agent_only_argv(run_dir: Path, steps: int) -> list[str]:
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
    ]


def step_time_torchrun(run_dir: Path, steps: int, timeout_s: float, agent: bool) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = _agent_only_argv(run_dir, steps) if agent else torchrun_argv(run_dir, steps, 0, max_restarts=0)
    with (run_dir / "torchrun.log").open("wb") as log:
        subprocess.run(
            ["nice", "-n", str(WORKER_NICE), *argv], stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=True
        )
    rows = [(float(t), int(s)) for a, s, t in _read(run_dir / "progress.log") if int(s) >= 2]
    sec = slope([s for _, s in rows], [t for t, _ in rows])
    return {"s_per_step": round(sec, 4) if sec else None, "samples": len(rows)}


async def run_overhead(
    reps: int, steps: int, run_root: Path, settings: Settings, timeout_s: float, log=print
) -> dict[str, Any]:
    ours, agent_only, bare = [], [], []
    for i in range(reps):  # interleaved: the load drifts less between the variants of one round
        log(f"overhead: agent+sidecar+services run {i + 1}/{reps}")
        ours.append(await step_time_ours(steps, run_root, settings, timeout_s))
        log(f"overhead: agent only (torchrun, no sidecar) run {i + 1}/{reps}")
        agent_only.append(step_time_torchrun(run_root / f"agent-{i}-{int(time.time())}", steps, timeout_s, True))
        log(f"overhead: bare loop run {i + 1}/{reps}")
        bare.append(step_time_torchrun(run_root / f"bare-{i}-{int(time.time())}", steps, timeout_s, False))
    o = summarize(r["s_per_step"] for r in ours)
    a = summarize(r["s_per_step"] for r in agent_only)
    b = summarize(r["s_per_step"] for r in bare)
    return {
        "steps": steps,
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
    }
