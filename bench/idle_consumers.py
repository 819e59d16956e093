"""What an idle consumer costs, and what one hop takes, per fetch wait (`bus.fetch_max_wait_ms`).

Every sidecar and service reads the bus through `shared.bus.Consumer`, which fetches in a loop;
a fetch that finds nothing is held by the broker for the fetch wait. This starts a broker (the
embedded one, or `--bootstrap` names another), N idle consumers of the commands topic in this
process, measures over `--idle-s` the CPU the broker and this process use, then publishes
`--probes` records at seeded random moments and times each one's arrival at a consumer (the
hop delay of a recovery's command).

    python -m flashrecovery.bench.idle_consumers --consumers 10 --waits 50,500 --json OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from flashrecovery.bench.cpu_share import cpu_seconds, stat_fields
from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.settings import BusSettings
from flashrecovery.shared.stack import free_port, start_broker


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (the broker: it outlives the measurement)."""
    fields = stat_fields(pid)
    assert fields is not None, f"process {pid} is gone"
    return cpu_seconds(fields)


async def measure(
    bootstrap: str, broker_pid: int | None, wait_ms: int, consumers: int, idle_s: float, probes: int
) -> dict[str, Any]:
    bus = BusSettings(topic_namespace=f"idle-{uuid.uuid4().hex[:6]}", fetch_max_wait_ms=wait_ms)
    await busmod.ensure_topics(bootstrap, bus)
    producer = busmod.Producer(bootstrap, bus, "idle-probe")
    await producer.start()
    arrivals: dict[bytes, float] = {}

    async def handler(value: Any, record: Any) -> None:
        arrivals.setdefault(value, time.monotonic())

    readers = [
        busmod.Consumer(
            bootstrap,
            bus,
            [T.COMMANDS],
            None,
            handler,
            producer,
            f"idle-{i}",
            from_latest=True,
            decoder=lambda b: b,
            dead_letters=False,
        )  # fmt: skip
        for i in range(consumers)
    ]
    for c in readers:
        await c.start()
    tasks = [asyncio.create_task(c.run()) for c in readers]
    try:
        for c in readers:
            await c.wait_assigned()
        await asyncio.sleep(2.0)  # past the first fetches and metadata
        b0, p0, t0 = cpu_s(broker_pid) if broker_pid else 0.0, time.process_time(), time.monotonic()
        await asyncio.sleep(idle_s)
        wall = time.monotonic() - t0
        broker_core = (cpu_s(broker_pid) - b0) / wall if broker_pid else None
        client_core = (time.process_time() - p0) / wall
        rng = random.Random(wait_ms)
        delays = []
        for i in range(probes):
            await asyncio.sleep(rng.uniform(0.05, 0.6))  # a random phase against the fetch loop
            key = f"probe-{i}".encode()
            sent = time.monotonic()
            await producer.publish_raw(T.COMMANDS, key)
            deadline = sent + 10.0
            while key not in arrivals and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            delays.append((arrivals.get(key, float("nan")) - sent) * 1000)
        return {
            "fetch_max_wait_ms": wait_ms,
            "consumers": consumers,
            "broker_cores": None if broker_core is None else round(broker_core, 4),
            "client_cores": round(client_core, 4),
            "per_consumer_cores": round(((broker_core or 0.0) + client_core) / consumers, 4),
            "hop_ms_median": round(statistics.median(delays), 1),
            "hop_ms_max": round(max(delays), 1),
            "hop_ms": [round(d, 1) for d in delays],
        }
    finally:
        for c in readers:
            c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        run_dir = Path(tempfile.mkdtemp(prefix="idle-consumers-"))
        port = free_port()
        broker = start_broker(run_dir, port)
        bootstrap = f"127.0.0.1:{port}"
    try:
        rows = []
        for wait in [int(w) for w in args.waits.split(",")]:
            rows.append(
                await measure(
                    bootstrap, broker.proc.pid if broker else None, wait, args.consumers, args.idle_s, args.probes
                )
            )
        return {
            "what": "idle consumers' CPU and one hop's delay per fetch wait",
            "broker": "embedded" if broker else "given (--bootstrap; its CPU is not read)",
            "host": platform.node(),
            "cores": os.cpu_count(),
            "load_before": round(os.getloadavg()[0], 2),
            "idle_s": args.idle_s,
            "rows": rows,
        }
    finally:
        if broker:
            broker.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--consumers", type=int, default=10)
    p.add_argument("--waits", default="50,500", help="fetch waits to measure, ms, comma-separated")
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--bootstrap", default=None, help="a running broker (default: start the embedded one)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    out = asyncio.run(run(args))
    for r in out["rows"]:
        print(
            f"wait {r['fetch_max_wait_ms']:>5} ms  {r['consumers']} idle consumers: broker {r['broker_cores']} core, "
            f"clients {r['client_cores']} core ({r['per_consumer_cores']} per consumer); "
            f"hop median {r['hop_ms_median']} ms, max {r['hop_ms_max']} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
