"""Fault-free soak at a chosen heartbeat rate (issue #14 item 3): the reference job trains through
the real services for `--seconds` with heartbeats every 1/hz s and the detector's miss count;
the goal is 0 incidents and 0 plans. Heartbeat rate and misses travel as the environment every
process of the run inherits (FLASHRECOVERY_SIDECAR__HEARTBEAT_INTERVAL_S,
FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES), as an operator would set them.

    python -m flashrecovery.bench.soak --seconds 600 --hz 4 --misses 3 --json OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

from flashrecovery.demo import reference_cluster
from flashrecovery.shared.settings import BusSettings, Settings

STEP_SLEEP_S = 0.2  # a few steps a second: the soak is about the heartbeats, not the compute


async def soak(seconds: float, run_dir: Path) -> dict:
    job = f"soak-{uuid.uuid4().hex[:8]}"
    settings = Settings(job_id=job, bus=BusSettings(topic_namespace=job, telemetry_partitions=2, linger_ms=2))
    steps = int(seconds / STEP_SLEEP_S) + 1000  # more than fit: the soak ends by time
    c = reference_cluster(settings, run_dir / job, steps, f"--step-sleep {STEP_SLEEP_S}")
    try:
        await c.start()
        await c.wait_until(lambda: c.min_step() >= 1, 300, "training to start")
        t0, first = time.monotonic(), c.min_step()
        while time.monotonic() - t0 < seconds and not c.finished():
            await asyncio.sleep(1.0)
        trained = time.monotonic() - t0
        await asyncio.sleep(3.0)  # an incident about the last seconds would still arrive
        return {
            "trained_s": round(trained, 1),
            "steps_trained": c.min_step() - first,
            "incidents": [i.reason for i in c.timeline.incidents],
            "plans": len(c.timeline.plans),
        }
    finally:
        await c.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--hz", type=float, default=4.0, help="heartbeats per second per node")
    p.add_argument("--misses", type=int, default=3, help="missed heartbeats that declare a node lost")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    os.environ["FLASHRECOVERY_SIDECAR__HEARTBEAT_INTERVAL_S"] = str(1.0 / args.hz)
    os.environ["FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES"] = str(args.misses)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fr-soak-") as d:
        out = asyncio.run(soak(args.seconds, Path(d)))
    out |= {
        "seconds": args.seconds,
        "heartbeat_hz": args.hz,
        "misses": args.misses,
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "ok": not out["incidents"] and out["plans"] == 0,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    raise SystemExit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
