"""Repeated in-process recovery of the reference job; prints median figures.

    python -m flashrecovery.bench.agent_stress --reps 20

One job (4 nodes x 2 ranks, dp 4 x tp 2) runs long enough for ``reps`` recoveries. Every
``gap`` steps after the previous recovery the driver SIGKILLs a rank by PID (rotating over ranks,
replacements included) once a warm standby is ready; a new standby is started after each
assignment, off the critical path (the pool is --standbys).
At the end, all replicas of a shard must hold bitwise-identical state (same digest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from flashrecovery.agent.testing_driver import LocalCluster


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gap", type=int, default=30,
                    help="steps from one recovery's resume to the next fault (the replaced "
                         "standby must be replenished and warm within it)")
    ap.add_argument("--first", type=int, default=6, help="step of the first fault")
    ap.add_argument("--standbys", type=int, default=None,
                    help="pre-started standby pool (default min(reps, 6)); refilled after use")
    ap.add_argument("--lazy", choices=["0", "1"], default="1", help="gloo lazy connect")
    ap.add_argument("--timeout", type=float, default=3000.0)
    ap.add_argument("--json", default=None, help="write all recovery records here")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep worker logs and dumps here")
    args = ap.parse_args(argv)

    steps = args.first + (args.gap + 2) * args.reps + 5
    plan = [(3 * i + 2) % 8 for i in range(args.reps)]
    pool = args.standbys if args.standbys is not None else min(args.reps, 6)
    cluster = LocalCluster(steps=steps, standbys=pool, kill_ranks=plan, kill_first_step=args.first,
                           kill_gap_steps=args.gap, replenish_standbys=True,
                           hang_timeout_s=30.0, command_timeout_s=600.0, verbose=args.verbose,
                           workdir=args.workdir,
                           env={"FLASHRECOVERY_GLOO_LAZY": args.lazy})
    t0 = time.time()
    try:
        cluster.start()
        res = cluster.run(timeout_s=args.timeout)
    finally:
        cluster.close()
    recs = [r.summary() for r in res.recoveries if r.failed]
    shards: dict[int, set[str]] = {}
    for r, d in res.done.items():
        shards.setdefault(r % cluster.tp, set()).add(d.digest)
    consistent = all(len(v) == 1 for v in shards.values())

    def med(key: str) -> float:
        vals = [r[key] for r in recs if r[key] is not None]
        return statistics.median(vals) if vals else float("nan")

    def mx(key: str) -> float:
        vals = [r[key] for r in recs if r[key] is not None]
        return max(vals) if vals else float("nan")

    print(f"recoveries: {len(recs)} of {args.reps} planned, steps {steps}, "
          f"wall {time.time() - t0:.1f} s, gloo lazy={args.lazy}")
    print(f"replicas consistent (one digest per shard): {consistent}")
    print(f"committed steps lost: {sum(r['lost_steps'] for r in recs)}")
    for key, label in [("fault_to_detect_s", "fault -> detected"),
                       ("fault_to_paused_s", "fault -> survivors paused"),
                       ("rebuild_s", "group rebuild (incl. first allreduce)"),
                       ("transfer_s", "state transfer"),
                       ("fault_to_resumed_s", "fault -> all resumed"),
                       ("fault_to_first_commit_s", "fault -> first committed step")]:
        print(f"  {label:40s} median {med(key):8.3f} s   max {mx(key):8.3f} s")
    print(f"  {'transfer bytes':40s} median {med('transfer_bytes'):10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1, default=str)
    return 0 if consistent and len(recs) == args.reps else 1


if __name__ == "__main__":
    sys.exit(main())
