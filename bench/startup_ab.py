"""How long a job takes to start: the e2e tests' cluster (4 nodes x 2 ranks, a spare, the real
services, the reference job) from nothing to its first committed step, under arms of sidecar
settings, interleaved in one run on one broker and Redis.

    python -m flashrecovery.bench.startup_ab --reps 3 [--steps 16] [--out F]

The arms: `cold` (each rank its own interpreter importing torch, as until stop 32),
`fork` (the ranks forked by their node's zygote, which imports torch and the agent) and
`fork+dynamo` (the default since stop 32: the zygote also imports torch._dynamo, which the
job's first optimizer pulls in). Each run is fault-free; a run's figures: `start_s` (until
every service and sidecar reports ready), `first_step_s` (until every rank has committed step
1, from the start), `finished_s` (until every rank wrote its final state). The order of the
arms rotates by rep. Start-up is where a test cluster spent most of its time (~50 of 68 s on 2
cores), and on a real node of 8 ranks it is 8 torch imports against one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from flashrecovery.demo import reference_cluster
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.stack import Stack, start_stack

from .stats import machine_info, summarize

OLD_PREIMPORT = "torch,flashrecovery.agent.managed"
ARMS: dict[str, dict[str, str]] = {
    "cold": {"FLASHRECOVERY_SIDECAR__RANK_FORK": "false", "FLASHRECOVERY_SIDECAR__STANDBY_PREIMPORT": OLD_PREIMPORT},
    "fork": {"FLASHRECOVERY_SIDECAR__RANK_FORK": "true", "FLASHRECOVERY_SIDECAR__STANDBY_PREIMPORT": OLD_PREIMPORT},
    "fork+dynamo": {},  # the defaults
}
TIMEOUT_S = 300.0


async def one(stack: Stack, root: Path, arm: str, steps: int, step_sleep: float) -> dict[str, Any]:
    saved = {k: os.environ.get(k) for k in ARMS["cold"]}
    os.environ.update(ARMS[arm])
    try:
        job = f"startup-{uuid.uuid4().hex[:6]}"
        settings = Settings(
            job_id=job,
            kafka_bootstrap=stack.kafka_bootstrap,
            redis_url=stack.redis_url,
            bus=BusSettings(topic_namespace=job, telemetry_partitions=2, linger_ms=2),
        )
        c = reference_cluster(settings, root / job, steps, f"--step-sleep {step_sleep}")
        t0 = time.monotonic()
        try:
            await c.start()
            start_s = time.monotonic() - t0
            await c.wait_until(lambda: c.min_step() >= 1, TIMEOUT_S, "the first step")
            first_step_s = time.monotonic() - t0
            await c.wait_until(c.finished, TIMEOUT_S, "the run to finish")
            finished_s = time.monotonic() - t0
            incidents = len(c.timeline.incidents)
        finally:
            await c.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "arm": arm,
        "start_s": round(start_s, 2),
        "first_step_s": round(first_step_s, 2),
        "finished_s": round(finished_s, 2),
        "incidents": incidents,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.3, help="as the e2e tests' job")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(ARMS)}")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fr-startup-") as tmp:
        root = Path(tmp)
        stack = start_stack(root / "stack")
        try:
            for rep in range(args.reps):
                k = rep % len(arms)
                for arm in arms[k:] + arms[:k]:  # rotate which arm goes first
                    runs.append({"rep": rep, **asyncio.run(one(stack, root, arm, args.steps, args.step_sleep))})
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            stack.stop()
    by_arm = {
        arm: {
            key: summarize(r[key] for r in runs if r["arm"] == arm) for key in ("start_s", "first_step_s", "finished_s")
        }
        for arm in arms
    }
    out = {
        "command": "python -m flashrecovery.bench.startup_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "arms": {a: ARMS[a] or "defaults" for a in arms},
        "by_arm": by_arm,
        "runs": runs,
        "machine": machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for arm, s in by_arm.items():
        print(
            f"{arm:12s} first step {s['first_step_s']['median']} s (n={s['first_step_s']['n']}, "
            f"{s['first_step_s']['min']}-{s['first_step_s']['max']}); finished {s['finished_s']['median']} s",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
