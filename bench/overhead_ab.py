"""The fault-free step time of the full deployment (agent + sidecars + services, the overhead
suite's "ours") under two values of one environment variable, interleaved in one run.

    python -m flashrecovery.bench.overhead_ab --env FLASHRECOVERY_SIDECAR__RANK_FORK --arms true,false \
        --pairs 3 --steps 30 --step-sleep 0.9 [--out F]

Why: the overhead suite compares ours with torchrun's bare loop, but a change to how the
deployment starts or runs its ranks (forked by the node's zygote, a transfer window, a
heartbeat rate) needs its own A/B on the same variant. Each run is bench/overhead.py's
step_time_ours (rank 0's steady-window seconds per step); the arms alternate which goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flashrecovery.shared.settings import Settings
from flashrecovery.shared.stack import start_stack

from .baseline import step_sleep_args
from .overhead import step_time_ours
from .stats import machine_info, ratio, summarize


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="the environment variable the arms set")
    p.add_argument("--arms", required=True, help="its two values, comma-separated")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per run, s")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if len(arms) != 2:
        raise SystemExit(f"--arms takes two values, got {args.arms!r}")
    saved = os.environ.get(args.env)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fr-overhead-ab-") as tmp:
        root = Path(tmp)
        stack = start_stack(root / "stack")
        base = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url)
        try:
            for pair in range(args.pairs):
                for arm in arms if pair % 2 == 0 else arms[::-1]:
                    os.environ[args.env] = arm
                    r = asyncio.run(
                        step_time_ours(args.steps, root, base, args.timeout, step_sleep_args(args.step_sleep))
                    )
                    runs.append({"pair": pair, "arm": arm, "s_per_step": r["s_per_step"], "cpu_cores": r["cpu_cores"]})
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "cpu_cores"}), flush=True)
        finally:
            stack.stop()
            if saved is None:
                os.environ.pop(args.env, None)
            else:
                os.environ[args.env] = saved
    by_arm = {arm: summarize(r["s_per_step"] for r in runs if r["arm"] == arm) for arm in arms}
    out = {
        "command": "python -m flashrecovery.bench.overhead_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "s_per_step_by_arm": by_arm,
        "ratio_first_over_second": ratio(by_arm[arms[0]]["median"], by_arm[arms[1]]["median"], 4),
        "runs": runs,
        "machine": machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for arm, s in by_arm.items():
        print(f"{args.env}={arm}: {s['median']} s/step (n={s['n']}, {s['min']}-{s['max']})", flush=True)
    print(f"ratio {arms[0]} / {arms[1]}: {out['ratio_first_over_second']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
