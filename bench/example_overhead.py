"""Fault-free step time of the DDP example three ways, interleaved in one run:

- ``plain@torchrun``: examples/ddp_mlp/train_plain.py under torchrun (what a user runs today);
- ``recoverable@torchrun``: examples/ddp_mlp/train.py under torchrun (the agent without a
  sidecar: its per-step work, the commit vote, reseed, buffer snapshot, copies in collectives);
- ``recoverable@flashrecovery``: train.py under ``flashrecovery run --standalone`` (the agent,
  the sidecar, the services, a standby).

    python -m flashrecovery.bench.example_overhead --runs 5 --steps 300 --json out.json

Step time is measured in steady state from rank 0's own progress lines (``step k ...`` every 10
steps, read as they arrive): (t(last) - t(first after warm-up)) / steps between; process start,
rendezvous and the stack's start-up are not in it. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_mlp"
STEP_LINE = re.compile(r"step (\d+) loss")
WARMUP = 20


def _command(kind: str, nproc: int, steps: int, out: str, step_sleep: float) -> list[str]:
    script = EXAMPLE / ("train_plain.py" if kind == "plain@torchrun" else "train.py")
    args = [str(script), "--steps", str(steps), "--out", out, "--step-sleep", str(step_sleep)]
    if kind.endswith("@torchrun"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return [
        sys.executable,
        "-m",
        "flashrecovery.cli",
        "run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--standbys",
        "1",
        *args,
    ]


def one_run(kind: str, nproc: int, steps: int, timeout_s: float, step_sleep: float = 0.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fr-overhead-") as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            _command(kind, nproc, steps, out, step_sleep),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen: dict[int, float] = {}
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                m = STEP_LINE.search(line)
                if m:
                    seen.setdefault(int(m.group(1)), time.perf_counter())
                if time.perf_counter() - t0 > timeout_s:
                    raise TimeoutError(f"{kind}: over {timeout_s} s")
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        wall = time.perf_counter() - t0
    marks = sorted(k for k in seen if k >= WARMUP)
    if rc != 0 or len(marks) < 2:
        return {"kind": kind, "ok": False, "rc": rc, "wall_s": round(wall, 3)}
    first, last = marks[0], marks[-1]
    return {"kind": kind, "ok": True, "wall_s": round(wall, 3), "step_s": (seen[last] - seen[first]) / (last - first)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument(
        "--step-sleep",
        type=float,
        default=0.0,
        help="seconds each step sleeps: a stand-in for a bigger model's compute",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    kinds = ["plain@torchrun", "recoverable@torchrun", "recoverable@flashrecovery"]
    rows = []
    for i in range(args.runs):
        order = kinds if i % 2 == 0 else kinds[::-1]  # interleaved, alternating order
        for kind in order:
            row = one_run(kind, args.nproc, args.steps, args.timeout, args.step_sleep)
            row["run"] = i
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {}
    for kind in kinds:
        times = [r["step_s"] for r in rows if r["kind"] == kind and r["ok"]]
        summary[kind] = {
            "n": len(times),
            "median_step_ms": round(1e3 * statistics.median(times), 3) if times else None,
            "min_step_ms": round(1e3 * min(times), 3) if times else None,
            "max_step_ms": round(1e3 * max(times), 3) if times else None,
            "failed": sum(1 for r in rows if r["kind"] == kind and not r["ok"]),
        }
    base = summary["plain@torchrun"]["median_step_ms"]
    for kind in kinds:
        m = summary[kind]["median_step_ms"]
        summary[kind]["ratio_vs_plain_torchrun"] = round(m / base, 4) if m and base else None
    out = {
        "runs": args.runs,
        "steps": args.steps,
        "nproc": args.nproc,
        "warmup_steps": WARMUP,
        "step_sleep_s": args.step_sleep,
        "loadavg_end": list(os.getloadavg()),
        "summary": summary,
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(summary[k]["failed"] == 0 for k in kinds) else 1


if __name__ == "__main__":
    sys.exit(main())
