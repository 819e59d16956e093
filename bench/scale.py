"""Scale independence of the control plane: real detector, planner, executor, Kafka and Redis
(flashrecovery/supervisor.py) with simulated sidecars (bench/simsidecars.py) in place of torch
workers. One node stops beating; we time fault -> RecoveryCompleted and its phases, and count
Redis commands (INFO commandstats delta) and Kafka messages per recovery."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.schemas import FaultIncident, RecoveryCompleted, RecoveryPlan
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.topology import grid_topology
from flashrecovery.supervisor import Supervisor

from .stats import summarize

RANKS_PER_NODE = 8
TP = 2
# Heartbeats one detector instance is given at most: it decodes and judges ~10-13k 8-rank beats/s
# on one core of the 2-core dev box (docs/detector.md), and the job is sharded across instances
# by heartbeat partition as it would be in production.
BEATS_PER_S_PER_DETECTOR = 8000
WATCHED = (T.INCIDENTS, T.PLANS, T.RECOVERY)


async def _commandstats(r: aioredis.Redis) -> dict[str, int]:
    info = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


def detectors_for(nodes: int, heartbeat_interval_s: float = 1.0) -> int:
    beats_per_s = nodes / heartbeat_interval_s
    return max(1, math.ceil(beats_per_s / BEATS_PER_S_PER_DETECTOR - 1e-9))


async def run_scale_point(
    ranks: int,
    run_root: Path,
    base: Settings,
    warmup_s: float = 8.0,
    timeout_s: float = 180.0,
    idle_s: float = 3.0,
    detectors: int | None = None,
    heartbeat_interval_s: float = 1.0,
    heartbeat_misses: int | None = None,
) -> dict[str, Any]:
    nodes = ranks // RANKS_PER_NODE
    # None: the detectors' own setting (base's, which the environment may have set)
    misses = heartbeat_misses or base.detector.heartbeat_misses
    detectors = detectors or detectors_for(nodes, heartbeat_interval_s)
    job = f"scale-{ranks}-{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(
        update={
            "job_id": job,
            "bus": BusSettings(topic_namespace=job, telemetry_partitions=8, control_partitions=1, linger_ms=2),
        }
    )
    sup = Supervisor(settings, run_root / job)
    seen: dict[str, int] = {}
    marks: dict[str, Any] = {}
    res: dict[str, Any] = {
        "ranks": ranks,
        "nodes": nodes,
        "ranks_per_node": RANKS_PER_NODE,
        "tp": TP,
        "detector_instances": detectors,
        "heartbeat_interval_s": heartbeat_interval_s,
        "heartbeat_misses": misses,
    }
    t_start = time.time()
    try:
        await asyncio.to_thread(sup.start_stack)
        await busmod.ensure_topics(sup.stack.kafka_bootstrap, settings.bus)
        reg = Registry.from_url(sup.stack.redis_url, job)
        t0 = time.perf_counter()
        await reg.init_job(grid_topology(job, nodes, RANKS_PER_NODE, TP, spares=1))
        res["registry_init_s"] = round(time.perf_counter() - t0, 3)
        await reg.close()
        redis = aioredis.Redis.from_url(sup.stack.redis_url)
        producer = busmod.Producer(sup.stack.kafka_bootstrap, settings.bus, "scale-watcher")
        await producer.start()

        async def on_event(ev: Any, record: Any) -> None:
            if getattr(ev, "job_id", None) != job:
                return
            if "fault_at" in marks and "done" not in marks:
                name = record.topic.removeprefix(f"{job}.")
                seen[name] = seen.get(name, 0) + 1
            if isinstance(ev, FaultIncident):
                marks.setdefault("incident", ev)
            elif isinstance(ev, RecoveryPlan):
                marks.setdefault("plan", ev)
            elif isinstance(ev, RecoveryCompleted) and ev.outcome != "superseded":
                marks.setdefault("done", ev)
                marks.setdefault("done_seen", time.time())

        # Only the few milestone events are read here; the acks and commands of a recovery are
        # counted by the simulator that sends and receives them, so the watcher adds no decoding
        # on the 2 cores the system under test uses (25k acks at 100k ranks). (The broker's end
        # offsets cannot count them: the local broker advances them once per batch.)
        watcher = busmod.Consumer(
            sup.stack.kafka_bootstrap,
            settings.bus,
            WATCHED,
            None,
            on_event,
            producer,
            "scale-watcher",
            from_latest=True,
        )
        await watcher.start()
        wtask = asyncio.create_task(watcher.run())
        await watcher.wait_assigned()
        names = [f"detector-{i}" for i in range(detectors)]
        for name in names:
            sup.start_service("detector", name, FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES=str(misses))
        sup.start_service("planner")
        sup.start_service("executor", "executor-0", FLASHRECOVERY_INSTANCE="0")
        await sup.wait_ready(["detector", "planner", "executor-0"], 120)
        # Detector instances name themselves (host-pid): wait until all of them are live.
        reg = Registry.from_url(sup.stack.redis_url, job)
        try:
            deadline = time.monotonic() + 60
            while sum(k.startswith("detector:") for k in await reg.live_services()) < detectors:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fewer than {detectors} detector instances live after 60 s")
                await asyncio.sleep(0.2)
        finally:
            await reg.close()
        out = sup.run_dir / "sim.json"
        sup.spawn(
            "sim",
            [
                sys.executable,
                "-m",
                "flashrecovery.bench.simsidecars",
                "--nodes",
                str(nodes),
                "--ranks",
                str(RANKS_PER_NODE),
                "--lose-at",
                str(warmup_s),
                "--interval",
                str(heartbeat_interval_s),
                "--out",
                str(out),
            ],
        )
        ready = out.with_suffix(".ready")
        deadline = time.monotonic() + 120
        while not ready.exists():
            if time.monotonic() > deadline or sup.procs["sim"].poll() is not None:
                raise RuntimeError(f"simulated sidecars did not start; see {sup.run_dir / 'sim.log'}")
            await asyncio.sleep(0.05)
        sim_t0 = time.monotonic()
        # the background Redis rate (service liveness keys, leases) over an idle window
        idle_s = min(idle_s, max(1.0, warmup_s - 2.0))
        idle0 = await _commandstats(redis)
        await asyncio.sleep(idle_s)
        idle = _delta(idle0, await _commandstats(redis))
        await asyncio.sleep(max(0.0, sim_t0 + warmup_s - 0.1 - time.monotonic()))
        before = await _commandstats(redis)
        marks["fault_at"] = time.time()
        deadline = time.monotonic() + timeout_s
        while "done" not in marks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no RecoveryCompleted after {timeout_s}s")
            await asyncio.sleep(0.05)
        after = await _commandstats(redis)
        sup.stop("sim")  # SIGTERM: the sim writes its report
        sim = json.loads(out.read_text())
        # every ack and command of the run belongs to this one recovery
        seen[T.ACKS.name], seen[T.COMMANDS.name] = sim["sent_acks"], sim["commands"]
        watcher.stop()
        await asyncio.gather(wtask, return_exceptions=True)
        await producer.stop()
        await redis.aclose()
        done: RecoveryCompleted = marks["done"]
        inc: FaultIncident | None = marks.get("incident")
        fault_at = sim["fault_at"]
        if fault_at is None:
            # Seen with the detectors behind their heartbeat load: a node taken for lost before
            # the simulated loss, and its recovery is what completed.
            why = f"{inc.fault_class} {inc.reason}" if inc else "no incident seen"
            raise RuntimeError(f"a recovery completed before the simulated node loss: {why}")
        window = marks["done_seen"] - marks["fault_at"]
        cmds = _delta(before, after)
        background = sum(idle.values()) / idle_s * window
        res.update(
            {
                "outcome": done.outcome,
                "fault_class": str(done.fault_class),
                "detection_s": round(inc.detected_at - fault_at, 3) if inc else None,
                "planning_s": round(marks["plan"].emitted_at - inc.detected_at, 3) if inc and "plan" in marks else None,
                "phases_s": done.phase_seconds,
                "rto_s": round(done.emitted_at - fault_at, 3),
                "recovery_after_detection_s": round(done.emitted_at - inc.detected_at, 3) if inc else None,
                "restarted_ranks": None,
                "redis_commands": sum(cmds.values()),
                "redis_background_estimate": round(background),
                "redis_top": dict(sorted(cmds.items(), key=lambda kv: -kv[1])[:6]),
                "kafka_messages": {k.removeprefix("flashrecovery.").removesuffix(".v1"): v for k, v in seen.items()},
                "kafka_control_messages": sum(seen.values()),
                "heartbeats_per_s": round(nodes + 1, 1),
                "sim": sim,
                "wall_s": round(time.time() - t_start, 1),
            }
        )
        if "plan" in marks:
            res["restarted_ranks"] = len(marks["plan"].restart_ranks)
        return res
    finally:
        await asyncio.to_thread(sup.stop_all)


def median_point(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per cluster size from its repeated runs: the median of every timing and count
    (phases too), the max RTO, and how many runs failed. The raw runs stay in the results."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[-1]) if runs else {}
    first = ok[0]

    def med(key: str) -> float | None:
        return summarize(r.get(key) for r in ok)["median"]

    phases = list(dict.fromkeys(k for r in ok for k in r.get("phases_s", {})))
    out = {
        k: first[k]
        for k in (
            "ranks",
            "nodes",
            "ranks_per_node",
            "tp",
            "detector_instances",
            "heartbeat_interval_s",
            "heartbeat_misses",
        )
        if k in first
    }
    out.update(
        {
            k: med(k)
            for k in (
                "detection_s",
                "planning_s",
                "rto_s",
                "recovery_after_detection_s",
                "redis_commands",
                "kafka_control_messages",
                "restarted_ranks",
            )
        }
    )
    out["phases_s"] = {p: summarize(r.get("phases_s", {}).get(p) for r in ok)["median"] for p in phases}
    out["rto_max_s"] = summarize(r.get("rto_s") for r in ok)["max"]
    out["runs"], out["failed_runs"] = len(ok), len(runs) - len(ok)
    out["outcomes"] = sorted({str(r.get("outcome")) for r in ok})
    return out
