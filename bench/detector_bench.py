"""Detector throughput and detection latency at scale.

One detector (the pure core fed through the real decode path, schemas.decode) paced in real
time against N nodes x R ranks beating at 1 Hz; each node's beat comes at its own phase in the
second, handed over in consumer-sized batches, with the core's tick every 100 ms. During the
load, one node goes silent (node lost) and one rank dies (worker exit). Reports messages/s, the
detector's CPU seconds per wall second (time spent in decode + observe + tick only, measured
with the process CPU clock) and both detection latencies; checks that no other incident fires.

    .venv/bin/python -m flashrecovery.bench.detector_bench --nodes 10000 --ranks 8 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import orjson

from flashrecovery.detector import core
from flashrecovery.detector.state import DetectorState
from flashrecovery.shared.schemas import SCHEMA_VERSION, decode
from flashrecovery.shared.settings import DetectorSettings

JOB = "bench"
STEP_S = 0.5
BATCH = 2000  # the bus consumer's max_poll_records
TICK_S = 0.1
LAG_LIMIT_S = 1.0  # DetectorService.LAG_LIMIT_S


def beat_bytes(node: int, ranks: int, seq: int, t: float, columns: bool = False, interval: float = 1.0) -> bytes:
    """A node heartbeat as a sidecar would encode it (built as a dict: cheap to generate);
    columns: the compact rank_columns form (sidecar setting rank_columns)."""
    step = int(t / STEP_S)
    since = t - step * STEP_S
    rows = [
        {
            "rank": node * ranks + lr,
            "local_rank": lr,
            "pid": 1000 + lr,
            "state": "running",
            "step": step,
            "step_time_s": STEP_S,
            "generation": 0,
            "long_phase": None,
            "long_phase_expected_s": None,
            "since_progress_s": since,
        }
        for lr in range(ranks)
    ]
    form = (
        {"rank_columns": {f: [r[f] for r in rows] for f in rows[0] if f not in ("long_phase", "long_phase_expected_s")}}
        if columns
        else {"ranks": rows}
    )
    return orjson.dumps(
        {
            "event_id": f"hb-{node}-{seq}",
            "schema_version": SCHEMA_VERSION,
            "job_id": JOB,
            "generation": 0,
            "emitted_at": t,
            "producer": f"sidecar/{node}",
            "kind": "node_heartbeat",
            "node_id": f"node-{node:05d}",
            "role": "active",
            "seq": seq,
            "interval_s": interval,
            "standby_ready": 0,
            **form,
        }
    )


def exit_bytes(node: int, rank: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": "exit-1",
            "schema_version": SCHEMA_VERSION,
            "job_id": JOB,
            "generation": 0,
            "emitted_at": 0.0,
            "producer": "sidecar",
            "kind": "worker_exit",
            "node_id": f"node-{node:05d}",
            "rank": rank,
            "pid": 1,
            "signal": 9,
            "exit_code": None,
            "step": 0,
            "expected": False,
        }
    )


def run(
    nodes: int,
    ranks: int,
    seconds: float,
    lost_at: float,
    crash_at: float,
    columns: bool = False,
    interval: float = 1.0,
    shards: int = 1,
) -> dict:
    """`interval`: every node's heartbeat interval (0.25: 4 Hz, issue #14 item 3). `shards`: the
    detector instances the telemetry partitions are split among; this one instance gets every
    `shards`-th node (the lost and the crashed node among them), as a partition of the topic would."""
    cfg = core.Config.from_settings(DetectorSettings(), producer="bench")
    nodes_all = nodes
    nodes = -(-nodes // shards)  # this instance's share; node indices below are 0..share-1
    state = DetectorState()
    lost_node, crash_node = nodes // 3, (2 * nodes) // 3
    crash_rank = crash_node * ranks + 1
    phase = [i / nodes for i in range(nodes)]  # node i beats at i/N of each interval
    seq = [0] * nodes
    last_beat = [0.0] * nodes
    incidents: list[tuple[float, object]] = []
    messages = 0
    cpu = 0.0
    lag_max = 0.0
    crash_sent: float | None = None
    cursor = 0  # next (second, node) to emit, as a flat counter
    total = int(seconds / interval) * nodes
    t0 = time.monotonic()
    next_tick = 0.0
    pending: list[tuple[float, bytes]] = []
    caught_up_at, frozen = 0.0, 0
    while True:
        now = time.monotonic() - t0
        if now >= seconds:
            break
        # what the sidecars have sent by now (generation is not timed as detector work)
        while cursor < total:
            beat, i = divmod(cursor, nodes)
            at = (beat + phase[i]) * interval
            if at > now:
                break
            cursor += 1
            if i == lost_node and at >= lost_at:
                continue
            seq[i] += 1
            last_beat[i] = at
            pending.append((at, beat_bytes(i, ranks, seq[i], at, columns, interval)))
        if crash_sent is None and now >= crash_at:
            crash_sent = now
            pending.append((now, exit_bytes(crash_node, crash_rank)))
        for start in range(0, len(pending), BATCH):
            batch = pending[start : start + BATCH]
            c0 = time.process_time()
            recv = time.monotonic() - t0
            for _, raw in batch:
                _, ds = core.observe(state, decode(raw), recv, cfg)
                for d in ds:
                    if d.kind == "incident":
                        incidents.append((time.monotonic() - t0, d.event))
            cpu += time.process_time() - c0
            messages += len(batch)
            if batch[0][0] >= 2.0:  # after the first second's node registrations
                lag_max = max(lag_max, recv - batch[0][0])
        behind = bool(pending) and (time.monotonic() - t0) - pending[-1][0] > LAG_LIMIT_S
        pending.clear()
        now = time.monotonic() - t0
        if not behind:
            caught_up_at = now
        else:
            frozen += 1
        if now >= next_tick:
            c0 = time.process_time()
            # as the service does: while behind the stream, the time-driven checks wait
            _, ds = core.tick(state, now if not behind else caught_up_at, cfg)
            cpu += time.process_time() - c0
            incidents += [(now, d.event) for d in ds if d.kind == "incident"]
            next_tick = now + TICK_S
        time.sleep(0.005)
    wall = time.monotonic() - t0
    by_class = {i.fault_class.value: (at, i) for at, i in incidents}
    lost = by_class.get("node_lost")
    crash = by_class.get("process_crash")
    return {
        "form": "rank_columns" if columns else "rank objects",
        "heartbeat_interval_s": interval,
        "shards": shards,
        "nodes_in_job": nodes_all,
        "nodes": nodes,
        "ranks_per_node": ranks,
        "ranks": nodes * ranks,
        "seconds": round(wall, 2),
        "messages": messages,
        "messages_per_s": round(messages / wall, 1),
        "rank_updates_per_s": round(messages * ranks / wall, 1),
        "detector_cpu_s_per_wall_s": round(cpu / wall, 3),
        "detector_cpu_us_per_message": round(cpu / max(messages, 1) * 1e6, 2),
        "max_lag_after_warmup_s": round(lag_max, 3),
        "ticks_held_while_behind": frozen,
        "node_lost_latency_from_last_beat_s": round(lost[0] - last_beat[lost_node], 3) if lost else None,
        "node_lost_budget_s": interval * cfg.heartbeat_misses + interval,
        "crash_latency_s": round(crash[0] - crash_sent, 4) if crash and crash_sent else None,
        "incidents": [
            {"class": i.fault_class.value, "nodes": list(i.root_cause_nodes), "ranks": list(i.root_cause_ranks)}
            for _, i in incidents
        ],
        "false_incidents": len(
            [
                1
                for _, i in incidents
                if i.root_cause_nodes not in ((f"node-{lost_node:05d}",), (f"node-{crash_node:05d}",))
            ]
        ),
    }


# ------------------------------------------------------------------ through the real broker


async def _produce(
    bootstrap: str, namespace: str, nodes: int, ranks: int, seconds: float, lost_at: float, crash_at: float, report: str
) -> None:
    """The sidecars of the whole cluster in one process: paced keyed produce of raw beats."""
    from aiokafka import AIOKafkaProducer

    from flashrecovery.shared import topics as T

    hb_topic = T.with_namespace(T.HEARTBEATS.name, namespace)
    ev_topic = T.with_namespace(T.WORKER_EVENTS.name, namespace)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1, max_batch_size=1 << 20)
    await p.start()
    lost_node, crash_node = nodes // 3, (2 * nodes) // 3
    seq = [0] * nodes
    last_beat = 0.0
    crash_wall = None
    sent = 0
    t0 = time.monotonic()
    cursor, total = 0, int(seconds) * nodes
    while cursor < total:
        now = time.monotonic() - t0
        while cursor < total:
            sec, i = divmod(cursor, nodes)
            at = sec + i / nodes
            if at > now:
                break
            cursor += 1
            if i == lost_node and at >= lost_at:
                continue
            seq[i] += 1
            if i == lost_node:
                last_beat = time.time()
            await p.send(hb_topic, beat_bytes(i, ranks, seq[i], at), key=f"node-{i:05d}".encode())
            sent += 1
        if crash_wall is None and now >= crash_at:
            crash_wall = time.time()
            await p.send(
                ev_topic, exit_bytes(crash_node, crash_node * ranks + 1), key=f"node-{crash_node:05d}".encode()
            )
        await asyncio.sleep(0.005)
    await p.flush()
    await p.stop()
    Path(report).write_text(
        json.dumps(
            {"lost_last_beat_wall": last_beat, "crash_wall": crash_wall, "sent": sent, "seconds": time.monotonic() - t0}
        )
    )


async def run_broker(nodes: int, ranks: int, seconds: float, lost_at: float, crash_at: float) -> dict:
    import subprocess
    import sys
    import tempfile

    from flashrecovery.detector.app import DetectorService
    from flashrecovery.shared.bus import ensure_topics
    from flashrecovery.shared.settings import BusSettings, Settings
    from flashrecovery.shared.stack import start_stack

    tmp = Path(tempfile.mkdtemp(prefix="detbench-"))
    stack = start_stack(tmp)
    try:
        settings = Settings(
            job_id=JOB,
            kafka_bootstrap=stack.kafka_bootstrap,
            redis_url=stack.redis_url,
            bus=BusSettings(topic_namespace="bench", telemetry_partitions=8),
        )
        await ensure_topics(settings.kafka_bootstrap, settings.bus)
        svc = DetectorService(settings, instance="bench")
        await svc.start()
        task = asyncio.create_task(svc.run())
        await svc.wait_assigned(60)
        report = tmp / "producer.json"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flashrecovery.bench.detector_bench",
                "--produce",
                stack.kafka_bootstrap,
                "--nodes",
                str(nodes),
                "--ranks",
                str(ranks),
                "--seconds",
                str(seconds),
                "--lost-at",
                str(lost_at),
                "--crash-at",
                str(crash_at),
                "--out",
                str(report),
            ]
        )
        c0, w0 = time.process_time(), time.monotonic()
        h0 = svc._consumer.handled
        while proc.poll() is None:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # drain what is still in flight
        cpu, wall = time.process_time() - c0, time.monotonic() - w0
        handled = svc._consumer.handled - h0
        await svc.stop()
        await asyncio.wait_for(task, 30)
        await svc.close()
        prod = json.loads(report.read_text())
        incs = [e for e in svc.published if getattr(e, "kind", "") == "fault_incident"]
        lost = next((i for i in incs if i.fault_class.value == "node_lost"), None)
        crash = next((i for i in incs if i.fault_class.value == "process_crash"), None)
        return {
            "mode": "broker (tansu, 8 partitions; producer in a second process; same 2-core host)",
            "nodes": nodes,
            "ranks_per_node": ranks,
            "seconds": round(wall, 2),
            "messages": handled,
            "messages_per_s": round(handled / wall, 1),
            "sent": prod["sent"],
            "detector_process_cpu_s_per_wall_s": round(cpu / wall, 3),
            "node_lost_latency_from_last_beat_s": round(lost.detected_at - prod["lost_last_beat_wall"], 3)
            if lost
            else None,
            "crash_latency_s": round(crash.detected_at - prod["crash_wall"], 3) if crash else None,
            "incidents": len(incs),
        }
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", action="store_true", help="also run through the real broker")
    ap.add_argument("--broker-nodes", type=int, default=None)
    ap.add_argument("--produce", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--lost-at", type=float, default=10.3)
    ap.add_argument("--crash-at", type=float, default=20.55)
    ap.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s (0.25: 4 Hz)")
    ap.add_argument("--shards", type=int, default=1, help="detector instances; this run is one of them")
    ap.add_argument("--columns", action="store_true", help="heartbeats in the compact rank_columns form")
    ap.add_argument("--out", default="bench/results/detector.json")
    args = ap.parse_args()
    if args.produce:
        asyncio.run(
            _produce(args.produce, "bench", args.nodes, args.ranks, args.seconds, args.lost_at, args.crash_at, args.out)
        )
        return
    result = {
        "core": run(
            args.nodes, args.ranks, args.seconds, args.lost_at, args.crash_at, args.columns, args.interval, args.shards
        )
    }
    if args.broker:
        result["broker"] = asyncio.run(
            run_broker(args.broker_nodes or args.nodes, args.ranks, args.seconds, args.lost_at, args.crash_at)
        )
    result["machine"] = f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
