"""A/B of one sidecar setting on goodput, in one run: goodput_trace runs alternating the two
values of an environment variable, same seed (so the same fault times), each run measured
against its own fault-free lead-in, since this box's speed drifts between runs.

    python -m flashrecovery.bench.refill_ab --pairs 3 --duration 120 --gap 40 --seed 9 --out F
        (default: FLASHRECOVERY_SIDECAR__STANDBY_REFILL_NICE 0 vs 19, the refill's import thread)
    python -m flashrecovery.bench.refill_ab --env FLASHRECOVERY_SIDECAR__STANDBY_FORK --arms false,true ...
        (standbys as new interpreters vs forked from the node's zygote)
    python -m flashrecovery.bench.refill_ab --env FLASHRECOVERY_AGENT_INTERRUPT_SIGNAL --arms 12,0 \
        --step-sleep 0.9 ...  (a pause cuts the step's compute short, or waits for its end)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from . import goodput_trace

ENV = "FLASHRECOVERY_SIDECAR__STANDBY_REFILL_NICE"
ARMS = "0,19"


def refill_cpu_s(samples: list[dict[str, Any]]) -> float:
    """CPU seconds spent by standbys first seen once the job trained (the refills, not the
    standbys started with the job), while they were standbys."""
    start = next((i for i, s in enumerate(samples) if s["min_step"] >= 1), len(samples))
    # the samples before training, not any later one whose step reads -1 (a recovery)
    before = {pid for s in samples[:start] for pid in s["procs"]}
    spent: dict[str, float] = {}
    for s in samples[start:]:
        for pid, p in s["procs"].items():
            if pid not in before and p["role"] == "standby":
                spent[pid] = p["cpu_s"]  # from the process's start: it was a standby all along
    return round(sum(spent.values()), 2)


def post_fault_ratio(summary: dict[str, Any]) -> float | None:
    """Median over faults of the rate in the 30 s after each fault over the lead-in rate."""
    lead = summary.get("lead_in_steps_per_s")
    per_fault = []
    for f in summary.get("after_faults", []):
        known = [r for r in f["steps_per_s"] if r is not None]
        if lead and known:
            per_fault.append(statistics.mean(known) / lead)
    return round(statistics.median(per_fault), 3) if per_fault else None


def one(
    env: str, arm: str, duration: float, gap: float, seed: int, root: Path, step_sleep: float = 0.0
) -> dict[str, Any]:
    os.environ[env] = arm
    out = asyncio.run(goodput_trace.trace(duration, gap, seed, root / arm, step_sleep=step_sleep))
    s, r = out["summary"], out["result"]
    warm = any(p.get("warm_start") for smp in out["samples"] for p in smp["procs"].values())
    return {
        "arm": arm,
        "goodput_vs_lead_in": s["goodput_vs_lead_in"],
        "lead_in_steps_per_s": s["lead_in_steps_per_s"],
        "net_steps_per_s": s["net_steps_per_s"],
        "post_fault_30s_vs_lead_in": post_fault_ratio(s),
        "refill_standby_cpu_s": refill_cpu_s(out["samples"]),
        "refill_ran_warm_start": warm,
        "forked_workers_seen": len(
            {
                pid
                for smp in out["samples"]
                for pid, p in smp["procs"].items()
                if p.get("forked") and p["role"] != "zygote"
            }
        ),
        "rto_s": r["rto_s"],
        "pause_s": r["pause_s"],
        "recoveries_done": r["recoveries_done"],
        "faults": len([f for f in r["faults"] if "rank" in f]),
        "after_faults": s["after_faults"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default=ENV, help="the environment variable the arms set")
    p.add_argument("--arms", default=ARMS, help="its two values, comma-separated")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--gap", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds every step sleeps (stand-in compute)")
    p.add_argument("--run-root", default=".runtime/bench/refill-ab")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    a, b = args.arms.split(",")
    runs = []
    for i in range(args.pairs):
        for arm in (a, b) if i % 2 == 0 else (b, a):  # alternate which goes first
            runs.append(
                {
                    "pair": i,
                    **one(args.env, arm, args.duration, args.gap, args.seed, Path(args.run_root), args.step_sleep),
                }
            )
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "after_faults"}), flush=True)
    arms = {}
    for arm in (a, b):
        mine = [r for r in runs if r["arm"] == arm]
        arms[arm] = {
            key: statistics.median(v) if (v := [r[key] for r in mine if r[key] is not None]) else None
            for key in (
                "goodput_vs_lead_in",
                "post_fault_30s_vs_lead_in",
                "refill_standby_cpu_s",
                "lead_in_steps_per_s",
            )
        }
        arms[arm]["spread_goodput_vs_lead_in"] = sorted(r["goodput_vs_lead_in"] for r in mine)
        for key in ("rto_s", "pause_s"):  # per recovery, pooled over the arm's runs
            pooled = sorted(x for r in mine for x in r[key])
            arms[arm][f"{key}_median"] = statistics.median(pooled) if pooled else None
            arms[arm][f"{key}_all"] = pooled
    out = {
        "command": "python -m flashrecovery.bench.refill_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "env": args.env,
        "medians_by_arm": arms,
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(arms, indent=1))


if __name__ == "__main__":
    main()
