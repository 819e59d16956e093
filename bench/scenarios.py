"""Stress run of the #12 scenarios through the same path as `flashrecovery demo --then
--service-fault`: each scenario N times in a row, outcome and RTO per run, medians.

    python -m flashrecovery.bench.scenarios --runs 5                 # every scenario
    python -m flashrecovery.bench.scenarios --runs 5 --only two-nodes-at-once,crash-in-last-step

An "exact" scenario passes a run when the job finished bitwise equal to a fault-free run of the
same job (one reference per job shape, run first) with 0 committed steps lost (executor figure
and heartbeat-observed figure); an "escalate" one when it ended in an escalation whose reason
names the expected cause. Not part of CI: minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from flashrecovery.cluster import states_equal
from flashrecovery.demo import run_once
from flashrecovery.scenario import SCENARIOS, FollowUp, ServiceFault
from flashrecovery.shared.logging import configure
from flashrecovery.shared.settings import load_settings

STEP_SLEEP_S = 0.1


def _verdict(name: str, rep: dict[str, Any], reference: dict | None) -> tuple[bool, str]:
    sc = SCENARIOS[name]
    if sc.expect == "escalate":
        ok = rep["outcome"] == "escalated" and sc.escalation_match in rep.get("reason", "")
        return ok, rep.get("reason", rep["outcome"])[:200]
    if rep["outcome"] != "done":
        return False, f"outcome {rep['outcome']}: {rep.get('reason', '')}"[:200]
    same, why = states_equal(reference, rep["_states"])
    lost = (rep["committed_steps_lost"], rep["committed_steps_lost_observed"])
    return same and lost == (0, 0), f"{why}; lost {lost}"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    run_root = Path(settings.runtime_dir).resolve() / "bench-scenarios"
    names = args.only or list(SCENARIOS)
    refs: dict[str, dict] = {}
    out: dict[str, Any] = {
        "runs_per_scenario": args.runs,
        "steps": args.steps,
        "at_step": args.at_step,
        "scenarios": {},
    }
    for name in names:
        sc = SCENARIOS[name]
        worker_args = f"--step-sleep {STEP_SLEEP_S} {sc.job_args}".strip()
        if sc.expect == "exact" and worker_args not in refs:
            ref = await run_once("none", 0, 1, args.steps, args.timeout, True, run_root, settings, worker_args)
            refs[worker_args] = ref["_states"]
        rows = []
        for i in range(args.runs):
            t0 = time.time()
            try:
                rep = await run_once(
                    sc.fault,
                    sc.rank,
                    sc.step(args.steps, args.at_step),
                    args.steps,
                    args.timeout,
                    True,
                    run_root,
                    settings,
                    worker_args,
                    [FollowUp.parse(t) for t in sc.then],
                    [ServiceFault.parse(f) for f in sc.service_faults],
                    sc.spares,
                )
                ok, why = _verdict(name, rep, refs.get(worker_args))
            except Exception as exc:  # noqa: BLE001 - a run that hangs or breaks is a failed run
                rep, ok, why = {"outcome": "error"}, False, repr(exc)[:200]
            rows.append(
                {
                    "run": i,
                    "pass": ok,
                    "why": why,
                    "outcome": rep.get("outcome"),
                    "rto_s": rep.get("rto_s"),
                    "wall_s": round(time.time() - t0, 1),
                    "recoveries": [(c["outcome"], c["rto_s"]) for c in rep.get("recoveries", [])],
                }
            )
            print(
                f"{name} run {i}: {'PASS' if ok else 'FAIL'} {rep.get('outcome')} rto {rep.get('rto_s')} ({why[:100]})",
                flush=True,
            )
        rtos = [r["rto_s"] for r in rows if r["rto_s"] is not None]
        out["scenarios"][name] = {
            "demo_args": sc.demo_args(args.steps, args.at_step),
            "expect": sc.expect,
            "passed": sum(r["pass"] for r in rows),
            "runs": rows,
            "rto_median_s": round(statistics.median(rtos), 3) if rtos else None,
            "rto_max_s": max(rtos) if rtos else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", type=lambda v: [x for x in v.split(",") if x], default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--at-step", type=int, default=12)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = [n for n in args.only or [] if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    configure("json", level="WARNING")
    out = asyncio.run(_main(args))
    print("\n| scenario | expect | passed | RTO median s | RTO max s |\n|---|---|---|---|---|")
    for name, r in out["scenarios"].items():
        print(f"| {name} | {r['expect']} | {r['passed']}/{len(r['runs'])} | {r['rto_median_s']} | {r['rto_max_s']} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if all(r["passed"] == len(r["runs"]) for r in out["scenarios"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
