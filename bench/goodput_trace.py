"""Where a goodput run of ours loses its steps: one `goodput_ours` run sampled every 2 s
(committed step; per trainer / standby process: cores, niceness, threads), then the net rate
before the first fault against the rate in 6-s windows after each fault.

    python -m flashrecovery.bench.goodput_trace --duration 200 --gap 40 --seed 7 --out trace.json

Why it exists: the goodput suite divides by a fault-free s/step taken in another run (the
overhead suite), so a box whose speed drifts between runs moves the figure; this trace gives
the run's own fault-free rate (before its first fault) and shows what follows each fault (the
recovery, then the used standby's replacement importing torch while the job trains)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from flashrecovery.shared.settings import Settings

from . import goodput
from .cpu_share import cpu_seconds, stat_fields

TRAINER = "agent.reference.train"
WARM_START = "sidecar.warm_start"
ZYGOTE = "sidecar.zygote"


def _trainer_procs() -> dict[int, dict[str, float]]:
    """pid -> CPU seconds so far, niceness, threads of every reference-job process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        forked = ZYGOTE.encode() in cmdline  # the node's zygote, or a worker it forked
        if TRAINER.encode() not in cmdline and not forked:
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None:
            out[int(entry.name)] = {
                "cpu_s": cpu_seconds(fields),
                "nice": int(fields[16]),
                "threads": int(fields[17]),
                "warm_start": WARM_START.encode() in cmdline,  # a refill standby (its import niced)
                "forked": forked,
                "ppid": int(fields[1]),
            }
    return out


def role(pid: int, p: dict[str, Any], ranks: dict[int, int], found: dict[int, dict[str, Any]]) -> str:
    """A rank, a standby, or a node's zygote (forked from nothing of its kind)."""
    if pid in ranks:
        return f"rank {ranks[pid]}"
    if p["forked"] and not found.get(p["ppid"], {}).get("forked"):
        return "zygote"
    return "standby"


def step_at(samples: list[dict[str, Any]], t: float) -> int | None:
    """The committed step of the last sample at or before t (None before the first)."""
    best = None
    for s in samples:
        if s["t"] <= t:
            best = s["min_step"]
    return best


def rate(samples: list[dict[str, Any]], a: float, b: float) -> float | None:
    sa, sb = step_at(samples, a), step_at(samples, b)
    if sa is None or sb is None or sa < 0 or b <= a or b > samples[-1]["t"]:
        return None  # before training, or past the last sample (the run ended)
    return (sb - sa) / (b - a)


def analyse(samples: list[dict[str, Any]], fault_at_s: list[float], width_s: float = 6.0, windows: int = 5):
    """Lead-in rate (training start + 5 s .. 1 s before the first fault) and the rate in
    `windows` windows of `width_s` after each fault, times relative to training start."""
    t0 = next((s["t"] for s in samples if s["min_step"] >= 1), None)
    if t0 is None or not fault_at_s:
        return {"lead_in_steps_per_s": None, "after_faults": []}
    lead = rate(samples, t0 + 5, t0 + fault_at_s[0] - 1)
    after = []
    for at in fault_at_s:
        rates = [rate(samples, t0 + at + k * width_s, t0 + at + (k + 1) * width_s) for k in range(windows)]
        after.append({"at_s": at, "steps_per_s": [None if r is None else round(r, 2) for r in rates]})
    return {"lead_in_steps_per_s": None if lead is None else round(lead, 2), "after_faults": after}


async def trace(duration_s: float, gap_s: float, seed: int, run_root: Path, step_sleep: float = 0.0) -> dict[str, Any]:
    captured: dict[str, Any] = {}
    original = goodput.reference_cluster

    def capture(*a: Any, **kw: Any):
        captured["cluster"] = original(*a, **kw)
        return captured["cluster"]

    samples: list[dict[str, Any]] = []

    async def sample() -> None:
        while "cluster" not in captured:
            await asyncio.sleep(0.2)
        c = captured["cluster"]
        while True:
            view = c.timeline.rank_view()
            ranks = {st.pid: r for r, (_, st) in view.items() if st is not None}
            found = _trainer_procs()
            procs = {str(pid): {**p, "role": role(pid, p, ranks, found)} for pid, p in found.items()}
            samples.append({"t": time.monotonic(), "min_step": c.min_step(), "procs": procs})
            await asyncio.sleep(2.0)

    goodput.reference_cluster = capture
    sampler = asyncio.create_task(sample())
    try:
        result = await goodput.goodput_ours(
            duration_s, gap_s, None, run_root, Settings(), seed=seed, step_sleep=step_sleep
        )
    finally:
        sampler.cancel()
        goodput.reference_cluster = original
    faults = [f["at_s"] for f in result["faults"] if "rank" in f]
    summary = analyse(samples, faults)
    # one definition of the ratio: goodput_ours's, whose lead-in is read at the fault itself
    summary["net_steps_per_s"] = result["steps_per_s"]
    summary["goodput_vs_lead_in"] = result["goodput_vs_lead_in"]
    return {"result": result, "summary": summary, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=200.0)
    p.add_argument("--gap", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--run-root", default=".runtime/bench/goodput-trace")
    p.add_argument("--out", default=None, help="write the samples and the summary as JSON here")
    args = p.parse_args(argv)
    out = asyncio.run(trace(args.duration, args.gap, args.seed, Path(args.run_root)))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
