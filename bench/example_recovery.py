"""RTO of the recoverable DDP example (examples/ddp_mlp/train.py) under `flashrecovery run
--standalone`: rank 1 SIGKILLs itself with its gradient all-reduce in flight; N runs, each
checked bitwise against one fault-free run of the same command.

    python -m flashrecovery.bench.example_recovery --runs 5 --json out.json

RTO and lost/recomputed steps are the executor's figures (its `plan_finished` line). Not CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flashrecovery.cluster import states_equal

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_mlp" / "train.py"


def _run(work: Path, out: Path, nproc: int, steps: int, fault: str | None) -> tuple[int, float, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHRECOVERY_")}
    env["FLASHRECOVERY_RUNTIME_DIR"] = str(work / "rt")
    if fault:
        env["FLASHRECOVERY_AGENT_FAULT"] = fault
    cmd = [
        sys.executable,
        "-m",
        "flashrecovery",
        "run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--standbys",
        "1",
        "--timeout",
        "300",
        str(SCRIPT),
        "--steps",
        str(steps),
        "--step-sleep",
        "0.1",
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=400)
    return proc.returncode, time.perf_counter() - t0, work / "rt"


def _states(out: Path, nproc: int) -> dict[int, dict]:
    states = {}
    for r in range(nproc):
        s = torch.load(out / f"rank{r}.pt", weights_only=False)
        states[r] = {
            "model": s["model"],
            "optimizer": s["optimizer"],
            "stateful": {"scheduler": s["scheduler"]},
            "step": s["step"],
        }
    return states


def _finished(rt: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for log in rt.rglob("executor-*.log")
        for line in log.read_text().splitlines()
        if '"plan_finished"' in line
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--at-step", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    fault = f"kind=kill,rank=1,step={args.at_step},phase=grad_sync"
    rows = []
    with tempfile.TemporaryDirectory(prefix="fr-example-rto-") as tmp:
        ref_dir = Path(tmp) / "ref"
        ref_dir.mkdir()
        code, wall, _ = _run(ref_dir, ref_dir / "out", args.nproc, args.steps, None)
        if code != 0:
            print(f"fault-free run failed ({code})", file=sys.stderr)
            return 1
        ref = _states(ref_dir / "out", args.nproc)
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            code, wall, rt = _run(work, work / "out", args.nproc, args.steps, fault)
            done = [p for p in _finished(rt) if p.get("outcome") == "done"]
            same, why = states_equal(ref, _states(work / "out", args.nproc)) if code == 0 else (False, f"exit {code}")
            row = {
                "run": i,
                "exit": code,
                "wall_s": round(wall, 2),
                "bitwise": same,
                "why": why,
                "rto_s": done[0]["rto_s"] if done else None,
                "committed_steps_lost": done[0].get("committed_steps_lost") if done else None,
                "steps_recomputed": done[0].get("steps_recomputed") if done else None,
                "phases": done[0].get("phases") if done else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    rtos = [r["rto_s"] for r in rows if r["rto_s"] is not None]
    summary = {
        "runs": args.runs,
        "nproc": args.nproc,
        "steps": args.steps,
        "fault": fault,
        "passed": sum(1 for r in rows if r["bitwise"] and r["committed_steps_lost"] == 0),
        "rto_median_s": statistics.median(rtos) if rtos else None,
        "rto_min_s": min(rtos, default=None),
        "rto_max_s": max(rtos, default=None),
        "loadavg_end": list(os.getloadavg()),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    return 0 if summary["passed"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
