"""Failure-free overhead: the reference job with agent + sidecar (the full local deployment)
against the bare loop (bench/baseline_train.py: plain torch.distributed gloo groups, no agent,
no checkpoints), same model and shape, interleaved runs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from flashrecovery.shared.settings import Settings

from .baseline import _read, torchrun_argv
from .recovery import step_time_ours
from .stats import ratio, slope, summarize


def step_time_bare(run_dir: Path, steps: int, timeout_s: float) -> dict[str, Any]:
    import shutil
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (run_dir / "torchrun.log").open("wb") as log:
        subprocess.run(torchrun_argv(run_dir, steps, 0, max_restarts=0), stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout_s, check=True)
    rows = [(float(t), int(s)) for a, s, t in _read(run_dir / "progress.log") if int(s) >= 2]
    sec = slope([s for _, s in rows], [t for t, _ in rows])
    return {"s_per_step": round(sec, 4) if sec else None, "samples": len(rows)}


async def run_overhead(reps: int, steps: int, run_root: Path, settings: Settings, timeout_s: float,
                       log=print) -> dict[str, Any]:
    ours, bare = [], []
    for i in range(reps):  # interleaved: ours, bare, ours, bare ... the load drifts less between pairs
        log(f"overhead: agent+sidecar run {i + 1}/{reps}")
        ours.append(await step_time_ours(steps, run_root, settings, timeout_s))
        log(f"overhead: bare loop run {i + 1}/{reps}")
        bare.append(step_time_bare(run_root / f"bare-{i}-{int(time.time())}", steps, timeout_s))
    o = summarize(r["s_per_step"] for r in ours)
    b = summarize(r["s_per_step"] for r in bare)
    return {"steps": steps, "reps": reps, "ours": ours, "bare": bare, "ours_s_per_step": o,
            "bare_s_per_step": b, "ratio": ratio(o["median"], b["median"], 3)}
