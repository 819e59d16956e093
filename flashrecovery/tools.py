"""Operator commands: `flashrecovery status`, `events --follow`, `inject`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .shared import bus as busmod
from .shared import topics as T
from .shared.keys import EXECUTOR_LEASE
from .shared.registry import Registry
from .shared.schemas import DeadLetter, NodeHeartbeat, SchemaError, decode, decode_dead_letter
from .shared.settings import ConfigError, Settings, load_settings
from .supervisor import live_job_addresses, pick_job_address


def _locate(settings: Settings) -> Settings:
    """The job to talk to: the addresses in FLASHRECOVERY_KAFKA_BOOTSTRAP / _REDIS_URL when set
    (as printed by `flashrecovery up`), else those a local `flashrecovery run --standalone`,
    `demo` or `up` left in <runtime dir>/jobs/ (FLASHRECOVERY_JOB_ID picks one of several)."""
    if settings.kafka_bootstrap and settings.redis_url:
        return settings
    wanted = settings.job_id if "job_id" in settings.model_fields_set else None
    try:
        a = pick_job_address(live_job_addresses(settings.runtime_dir), wanted)
    except ValueError as exc:
        raise ConfigError(f"{exc} (looked in {Path(settings.runtime_dir).resolve() / 'jobs'})") from None
    return settings.model_copy(
        update={
            "job_id": a["job_id"],
            "kafka_bootstrap": a["kafka_bootstrap"],
            "redis_url": a["redis_url"],
            "rdzv": a.get("rdzv") or settings.rdzv,
            "bus": settings.bus.model_copy(update={"topic_namespace": a.get("topic_namespace", "")}),
        }
    )


# ---------------------------------------------------------------- status
def add_status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="cluster view from the registry and the live heartbeats")
    p.add_argument("--listen", type=float, default=1.5, help="seconds of heartbeats to read")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)


async def _status(settings: Settings, listen_s: float) -> dict[str, Any]:
    reg = Registry.from_url(settings.redis_url, settings.job_id)
    try:
        try:
            snap = await reg.snapshot()
        except LookupError:  # Redis restarted empty, or the job never registered
            snap = None
        incidents = {i: await reg.incident(i) for i in await reg.open_incidents()}
        services = await reg.live_services()
        leader = await reg.lease_holder(EXECUTOR_LEASE)
        notes = await reg.quarantine_notes()  # node -> json {reason, at} of `node quarantine`
    finally:
        await reg.close()
    beats: dict[str, NodeHeartbeat] = {}
    if listen_s > 0:
        beats = await _listen_heartbeats(settings, listen_s)
    live = {r.rank: (hb.node_id, r) for hb in beats.values() for r in hb.rank_statuses() if r.rank is not None}
    escalated = {i: d.get("reason", "") for i, d in incidents.items() if d.get("phase") == "escalated"}
    open_incidents = {i: {k: v for k, v in d.items() if k != "incident"} for i, d in incidents.items()}
    if snap is None:
        return {
            "job_id": settings.job_id,
            "topology": "missing",
            "generation": None,
            "committed_step": None,
            "world_size": None,
            "layout": None,
            "services": services,
            "executor_leader": leader,
            "nodes": [],
            "ranks": [],
            "open_incidents": open_incidents,
            "escalated": escalated,
        }
    return {
        "topology": "present",
        "escalated": escalated,
        "job_id": snap.job_id,
        "generation": snap.generation,
        "committed_step": snap.committed_step,
        "world_size": snap.world_size,
        "layout": f"dp={snap.dp} tp={snap.tp} pp={snap.pp}",
        "services": services,
        "executor_leader": leader,
        "nodes": [
            {
                "node": n.node_id,
                "role": str(n.role),
                "ranks": list(n.ranks),
                **({"quarantine_note": notes[n.node_id]} if n.node_id in notes else {}),
                "standby_ready": beats[n.node_id].standby_ready if n.node_id in beats else None,
                "heartbeat": n.node_id in beats,
            }
            for n in snap.nodes
        ],
        "ranks": [
            {
                "rank": r.rank,
                "node": r.node_id,
                "shard": r.shard_id,
                "dp": r.dp,
                "tp": r.tp,
                "state": str(live[r.rank][1].state) if r.rank in live else str(r.state),
                "step": live[r.rank][1].step if r.rank in live else r.step,
                "pid": live[r.rank][1].pid if r.rank in live else r.pid,
            }
            for r in snap.ranks
        ],
        "open_incidents": open_incidents,
    }


async def _listen_heartbeats(settings: Settings, seconds: float) -> dict[str, NodeHeartbeat]:
    beats: dict[str, NodeHeartbeat] = {}

    async def keep(ev: Any, record: Any) -> None:
        if isinstance(ev, NodeHeartbeat) and ev.job_id == settings.job_id:
            if ev.node_id not in beats or ev.seq > beats[ev.node_id].seq:
                beats[ev.node_id] = ev

    producer = busmod.Producer(settings.kafka_bootstrap, settings.bus, "status")
    await producer.start()
    c = busmod.Consumer(
        settings.kafka_bootstrap, settings.bus, [T.HEARTBEATS], None, keep, producer, "status", from_latest=True
    )
    await c.start()
    task = asyncio.create_task(c.run())
    await asyncio.sleep(seconds)
    c.stop()
    await asyncio.gather(task, return_exceptions=True)
    await producer.stop()
    return beats


def status(args: argparse.Namespace) -> int:
    settings = _locate(load_settings())
    view = asyncio.run(_status(settings, args.listen))
    # The Prometheus endpoints a local `up` / cluster left in its address file ({} elsewhere).
    view["metrics"] = next(
        (a.get("metrics", {}) for a in live_job_addresses(settings.runtime_dir) if a.get("job_id") == view["job_id"]),
        {},
    )
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    if view["topology"] == "missing":
        print(
            f"job {view['job_id']}: the registry has no topology (lost, e.g. Redis restarted "
            "empty, or never registered): no recovery can be planned"
        )
    print(
        f"job {view['job_id']}  generation {view['generation']}  committed step {view['committed_step']}  "
        f"world {view['world_size']} ({view['layout']})  executor leader {view['executor_leader']}"
    )
    print(f"services: {', '.join(view['services']) or 'none live'}")
    if view["metrics"]:
        print("metrics: " + "  ".join(f"{n} http://{a}/metrics" for n, a in view["metrics"].items()))
    for n in view["nodes"]:
        print(
            f"  {n['node']:<10} {n['role']:<12} ranks {n['ranks']}  heartbeat {'yes' if n['heartbeat'] else 'NO'}"
            + (f"  standbys {n['standby_ready']}" if n["standby_ready"] else "")
        )
    for r in view["ranks"]:
        print(
            f"    rank {r['rank']:>3} {r['node']:<10} shard {r['shard']} {r['state']:<10} step {r['step']:>5} pid {r['pid']}"
        )
    print(f"open incidents: {view['open_incidents'] or 'none'}")
    for iid, reason in view["escalated"].items():
        print(f"ESCALATED {iid}: {reason}")
    return 0


# ---------------------------------------------------------------- events
def add_events_parser(sub: Any) -> None:
    p = sub.add_parser("events", help="tail the event topics")
    p.add_argument("--follow", action="store_true", help="keep reading new events")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument(
        "--topics",
        default="incidents,plans,commands,acks,recovery,worker-events",
        help="comma-separated short names (heartbeats too, if you want them)",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="without --follow: how long to read")
    p.set_defaults(func=events)


def _decode_or_dead_letter(raw: bytes | None) -> Any:
    """An event, or a record of the dead-letter topic (which has no event envelope)."""
    try:
        return decode(raw)
    except SchemaError:
        try:
            return decode_dead_letter(raw)
        except SchemaError:
            pass
        raise


def _line(ev: Any) -> str:
    if isinstance(ev, DeadLetter):
        head = f"{time.strftime('%H:%M:%S', time.localtime(ev.at))} dead_letter       "
        return (
            f"{head} topic={ev.topic} partition={ev.partition} offset={ev.offset} consumer={ev.consumer} "
            f"size={ev.raw_size} truncated={ev.raw_truncated} reason={ev.reason[:200]}"
        )
    d = ev.model_dump(mode="json")
    head = f"{time.strftime('%H:%M:%S', time.localtime(d['emitted_at']))} g{d['generation']} {d['kind']:<18}"
    skip = {"event_id", "schema_version", "job_id", "generation", "emitted_at", "kind", "producer"}
    body = " ".join(f"{k}={v}" for k, v in d.items() if k not in skip and v not in (None, [], {}, ""))
    return f"{head} {body[:300]}"


def events(args: argparse.Namespace) -> int:
    settings = _locate(load_settings())
    wanted = [t for t in T.ALL if t.name.split(".")[1] in args.topics.split(",")]

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def show(ev: Any, record: Any) -> None:
            # Dead letters carry no job id: the namespace's topic is the job's.
            if getattr(ev, "job_id", settings.job_id) == settings.job_id:
                print(ev.model_dump_json() if args.json else _line(ev), flush=True)

        producer = busmod.Producer(settings.kafka_bootstrap, settings.bus, "events")
        await producer.start()
        # An onlooker: what it cannot read is skipped with a log line, never dead-lettered (a
        # reader of the dead-letter topic would otherwise re-dead-letter its own input).
        c = busmod.Consumer(
            settings.kafka_bootstrap,
            settings.bus,
            wanted,
            None,
            show,
            producer,
            "events",
            dead_letters=False,
            decoder=_decode_or_dead_letter,
        )
        await c.start()
        task = asyncio.create_task(c.run())
        if args.follow:
            await stop.wait()
        else:
            try:
                await asyncio.wait_for(stop.wait(), args.seconds)
            except TimeoutError:
                pass
        c.stop()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()

    asyncio.run(go())
    return 0


# ---------------------------------------------------------------- inject
def add_inject_parser(sub: Any) -> None:
    p = sub.add_parser("inject", help="inject a fault into a running job on this machine")
    p.add_argument("fault", choices=["process-crash", "hang", "node-crash"])
    p.add_argument("--rank", type=int, required=True)
    p.set_defaults(func=inject)


def inject(args: argparse.Namespace) -> int:
    """Finds the rank's PID from the live heartbeats; only processes of this machine are hit."""
    settings = _locate(load_settings())
    beats = asyncio.run(_listen_heartbeats(settings, 1.5))
    hit = next(((hb, r) for hb in beats.values() for r in hb.rank_statuses() if r.rank == args.rank), None)
    if hit is None:
        print(f"rank {args.rank} not seen in the heartbeats", file=sys.stderr)
        return 1
    hb, r = hit
    if args.fault == "process-crash":
        os.kill(r.pid, signal.SIGKILL)
    elif args.fault == "hang":
        os.kill(r.pid, signal.SIGSTOP)
    else:
        sidecar = _sidecar_pid(r.pid)  # read before the kill: the node is its sidecar and workers
        for other in hb.rank_statuses():
            os.kill(other.pid, signal.SIGKILL)
        os.kill(sidecar, signal.SIGKILL)
    print(f"{args.fault} injected on rank {args.rank} (pid {r.pid}, {hb.node_id}) at {time.time():.3f}")
    return 0


def _sidecar_pid(worker_pid: int) -> int:
    with open(f"/proc/{worker_pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
