"""The hostile run (issue #16 item 5): N hostile records (flashrecovery/hostile.py) fired at a
steady rate at every topic of a job's namespace while the job trains, through the real broker,
Redis, services, sidecars and torch workers.

    python -m flashrecovery.bench.hostile_run --messages 10000 [--signing] \\
        [--broker-schemas on|off] --json OUT

Goals, each checked (exit 1 and `ok: false` when one is missed): no incident, plan or command
from the control plane; every service, sidecar, stack and worker process alive and no worker
replaced; the final training state bitwise equal to a fault-free run of the same job; the burst
over before training ended; and every record accounted for: refused by the broker at produce
time, or dead-lettered by exactly the consumers that must (matched by topic, partition and
offset), or refused by its consumer with a log line, or ignored by design (another job's
record on a control topic; the recovery topic, which no service reads). See `ACCOUNTING`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from flashrecovery import hostile as H
from flashrecovery.cluster import LocalCluster, states_equal
from flashrecovery.demo import reference_cluster
from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.logging import configure
from flashrecovery.shared.schemas import NodeHeartbeat, SchemaError, decode_dead_letter
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.signing import load_keyring, write_key_file
from flashrecovery.shared.stack import start_stack

ACCOUNTING = {
    H.MALFORMED: "dead-lettered by every consumer of its topic that dead-letters (the recovery topic has none)",
    H.UNTRUSTED: "dead-lettered 'untrusted' by the detector (admission: unknown node/rank, generation ahead, "
    "another job)",
    H.REFUSED: "not dead-lettered: refused by its consumer with a log line, counted from the logs: every "
    "sidecar logs command_refused once per copy (checked exactly); the planner logs one planner_decision "
    "(no_plan, incident_refused: an escalation) or incident_duplicate per valid incident (checked exactly, "
    "with the other job's incident_ignored); the executor leader logs plan_refused_invalid and publishes a "
    "failed completion (checked: at least once per plan id, at most once per copy); an ack for a command "
    "never sent is kept and matches nothing (no line)",
    H.OTHER_JOB: "not dead-lettered: ignored by job id without a line (a topic may carry several jobs' records)",
    H.NO_CONSUMER: "the recovery topic: no service reads it (operators' tools only)",
    H.UNAUTHENTICATED: "dead-lettered 'unauthenticated' by every consumer of its topic",
}


@dataclass
class Config:
    messages: int = 10_000
    rate: float = 150.0  # records per second, steady
    signing: bool = False
    broker_schemas: bool = False
    seed: int = 0
    step_sleep_s: float = 0.3
    steps: int = 0  # 0: enough for the burst plus pre_s and a margin
    pre_s: float = 8.0  # training measured before the burst
    margin_s: float = 10.0  # training planned past the burst (steps: 0)
    oversized: int = 3
    max_step_ratio: float = 4.0  # step time during the burst / before: above it, training was hurt
    drain_timeout_s: float = 120.0
    timeout_s: float = 900.0


def dead_letter_consumers(c: LocalCluster) -> dict[str, set[str]]:
    """Topic -> the consumers that dead-letter its bad records (the names they sign letters with)."""
    executors = [f"executor-{i}" for i in range(c.executors)]
    sidecars = [f"sidecar-node-{n}" for n in range(c.nodes)] + [f"sidecar-spare-{s}" for s in range(c.spares)]
    return {
        T.HEARTBEATS.name: {"detector"},
        T.WORKER_EVENTS.name: {"detector"},
        T.INCIDENTS.name: {"planner"},
        T.PLANS.name: {f"{e}-plans" for e in executors},
        T.COMMANDS.name: set(sidecars),
        T.ACKS.name: {f"{e}-acks" for e in executors},
        T.RECOVERY.name: set(),
    }


def expected_letters(h: H.Hostile, consumers: dict[str, set[str]]) -> set[str]:
    if h.expect in (H.MALFORMED, H.UNAUTHENTICATED):
        return set(consumers[h.topic.name])
    if h.expect == H.UNTRUSTED:
        return {"detector"}
    return set()


def _settings(stack: Any, job: str, key_file: Path | None) -> Settings:
    return Settings(
        job_id=job,
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        bus=BusSettings(
            topic_namespace=job,
            telemetry_partitions=2,
            linger_ms=2,
            signing_key_file=str(key_file) if key_file else None,
        ),
    )


async def _fault_free(stack: Any, run_dir: Path, steps: int) -> dict:
    """The same job, no hostile input, no step sleep (it does not change the math)."""
    job = f"ref-{uuid.uuid4().hex[:8]}"
    c = reference_cluster(_settings(stack, job, None), run_dir / job, steps)
    try:
        await c.start()
        await c.wait_until(c.finished, 600, "the fault-free run to finish")
        return c.final_states()
    finally:
        await c.stop()


class StepLog:
    """(emitted_at, rank, step) from the job's own heartbeats. Not the cluster's timeline: that
    one takes every heartbeat of the job's topic as it comes, the hostile ones too (a real
    node's rank at step 10^6), and stamps them with their receive time, which lags during the
    burst. Hostile records say producer "hostile"; with signing on, forgeries never get here."""

    def __init__(self, job: H.Job) -> None:
        self.job = job
        self.samples: list[tuple[float, int, int]] = []

    async def __call__(self, ev: Any, record: Any) -> None:
        if not isinstance(ev, NodeHeartbeat) or ev.producer == "hostile" or ev.job_id != self.job.job_id:
            return
        for r in ev.rank_statuses():
            if r.rank is not None and 0 <= r.rank < self.job.world_size:
                self.samples.append((ev.emitted_at, r.rank, r.step))

    def committed(self, t: float) -> int:
        """The highest step every rank had applied at wall time t, as its heartbeats said."""
        top: dict[int, int] = {}
        for at, rank, step in self.samples:
            if at <= t:
                top[rank] = max(top.get(rank, -1), step)
        return min(top.values()) if len(top) == self.job.world_size else -1

    def seconds_per_step(self, t0: float, t1: float) -> float | None:
        steps = self.committed(t1) - self.committed(t0)
        return (t1 - t0) / steps if steps > 0 else None


async def _fire(
    c: LocalCluster, records: list[H.Hostile], rate: float
) -> tuple[list[tuple[int, int] | None], list[str | None], float]:
    """Produce every record at `rate` per second, one at a time (a refused record must not
    take the records batched with it down too). -> (partition, offset) or None, the produce
    error or None, per record; and the achieved rate."""
    ns = c.settings.bus.topic_namespace
    p = AIOKafkaProducer(
        bootstrap_servers=c.sup.stack.kafka_bootstrap, max_request_size=8 << 20, request_timeout_ms=15000
    )
    await asyncio.wait_for(p.start(), 30)
    where: list[tuple[int, int] | None] = []
    errors: list[str | None] = []
    t0 = time.monotonic()
    try:
        for i, h in enumerate(records):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                md = await asyncio.wait_for(
                    p.send_and_wait(
                        T.with_namespace(h.topic.name, ns), h.value, key=h.key, headers=list(h.headers) or None
                    ),
                    30,
                )
                where.append((md.partition, md.offset))
                errors.append(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker refusing it is a result
                where.append(None)
                errors.append(type(exc).__name__)
    finally:
        await p.stop()
    return where, errors, len(records) / max(time.monotonic() - t0, 1e-9)


async def _letters_until_settled(settings: Settings, want: int, timeout_s: float) -> list[Any]:
    """The dead-letter topic, read again until it holds `want` letters and stops growing (or
    timeout_s: then what is there)."""
    deadline = time.monotonic() + timeout_s
    last, stable_since = -1, time.monotonic()
    while True:
        records = await busmod.read_to_end(settings.kafka_bootstrap, settings.bus, T.DEAD_LETTER, 30)
        if len(records) != last:
            last, stable_since = len(records), time.monotonic()
        if (len(records) >= want and time.monotonic() - stable_since >= 3.0) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(1.0)


def _log_events(run_dir: Path, names: set[str]) -> dict[str, Counter]:
    """process log file stem -> Counter of the structlog events in `names` it wrote (the
    planner's decisions as planner_decision:<outcome>)."""
    out: dict[str, Counter] = {}
    for path in sorted(run_dir.glob("*.log")):
        counts: Counter = Counter()
        for line in path.read_text(errors="replace").splitlines():
            if '"event"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            ev = rec.get("event")
            if ev == "planner_decision":
                ev = f"planner_decision:{rec.get('outcome')}"
            if ev in names or str(ev).startswith("planner_decision:"):
                counts[ev] += 1
        if counts:
            out[path.stem] = counts
    return out


def _alive(c: LocalCluster, stack: Any) -> dict[str, Any]:
    procs = {name: p.poll() is None for name, p in c.sup.procs.items()}
    for owned in list(stack.owned) + (list(c.sup.stack.owned) if c.sup.stack else []):
        procs[owned.name] = owned.proc.poll() is None
    return {"checked": len(procs), "dead": sorted(n for n, ok in procs.items() if not ok)}


async def run(cfg: Config, run_dir: Path, stack: Any = None) -> dict[str, Any]:
    """The whole run; `stack`: one already running (its broker then validates nothing unless
    it was started so), else one is started here and stopped at the end."""
    own_stack = stack is None
    ns_job = f"hostile-{uuid.uuid4().hex[:8]}"
    if own_stack:
        stack = start_stack(run_dir / "stack", schema_namespace=ns_job if cfg.broker_schemas else None)
    key_file = write_key_file(run_dir / "keys.json") if cfg.signing else None
    burst_s = cfg.messages / cfg.rate
    steps = cfg.steps or int((cfg.pre_s + burst_s + cfg.margin_s) / cfg.step_sleep_s)
    c: LocalCluster | None = None
    try:
        t_ref = time.monotonic()
        reference = await _fault_free(stack, run_dir, steps)
        ref_s = time.monotonic() - t_ref
        settings = _settings(stack, ns_job, key_file)
        c = reference_cluster(settings, run_dir / ns_job, steps, f"--step-sleep {cfg.step_sleep_s}")
        await c.start()
        await c.wait_until(lambda: c.min_step() >= 2, 300, "training to start")
        pids = {r: s.pid for r, (_, s) in c.timeline.rank_view().items()}
        job = H.Job(ns_job, tuple(f"node-{n}" for n in range(c.nodes)), c.world, c.ranks_per_node)
        records = list(
            H.generate(
                cfg.messages,
                job,
                cfg.seed,
                topic_name=lambda t: T.with_namespace(t.name, ns_job),
                keyring=load_keyring(key_file) if key_file else None,
                oversized=cfg.oversized,
            )
        )
        steps_seen = StepLog(job)
        producer = busmod.Producer(stack.kafka_bootstrap, settings.bus, "hostile-steps")
        await producer.start()
        hb = busmod.Consumer(
            stack.kafka_bootstrap,
            settings.bus,
            [T.HEARTBEATS],
            None,
            steps_seen,
            producer,
            "hostile-steps",
            from_latest=True,
            dead_letters=False,
        )
        await hb.start()
        hb_task = asyncio.create_task(hb.run())
        await hb.wait_assigned()
        t_pre = time.time()
        await asyncio.sleep(cfg.pre_s)
        t_burst = time.time()
        where, errors, achieved = await _fire(c, records, cfg.rate)
        t_end = time.time()
        trained_through = not c.finished()
        # one heartbeat interval past the burst, so the last steps inside it are reported
        await asyncio.sleep(1.5)
        hb.stop()
        await asyncio.gather(hb_task, return_exceptions=True)
        await producer.stop()
        await c.wait_until(c.finished, cfg.timeout_s, "training to finish after the burst")
        consumers = dead_letter_consumers(c)
        want = sum(len(expected_letters(h, consumers)) for h, w in zip(records, where) if w is not None)
        letter_records = await _letters_until_settled(settings, want, cfg.drain_timeout_s)
        await asyncio.sleep(2.0)  # an incident about the last records would still arrive
        alive = _alive(c, stack)
        final = c.final_states()
        equal, why = states_equal(reference, final)
        replaced = sorted(r for r, pid in pids.items() if final[r].get("pid") != pid)
        tl = c.timeline
        produced_by_us = "hostile"
        report = _account(records, where, errors, letter_records, consumers, ns_job)
        logs = _log_events(
            c.run_dir,
            {"command_refused", "plan_refused_invalid", "incident_duplicate", "incident_ignored"},
        )
        before = steps_seen.seconds_per_step(t_pre, t_burst)
        during = steps_seen.seconds_per_step(t_burst, t_end)
        result: dict[str, Any] = {
            "config": asdict(cfg),
            "steps": steps,
            "records": len(records),
            "achieved_rate_per_s": round(achieved, 1),
            "burst_s": round(t_end - t_burst, 2),
            "reference_run_s": round(ref_s, 1),
            "trained_through_burst": trained_through,
            **report,
            "refusals_logged": {k: dict(v) for k, v in logs.items()},
            "incidents": sum(1 for i in tl.incidents if i.producer != produced_by_us),
            "plans": sum(1 for p in tl.plans if p.producer != produced_by_us),
            "commands": sum(
                1 for e in tl.other if getattr(e, "kind", "") == "executor_command" and e.producer != produced_by_us
            ),
            "escalations": sum(
                1 for e in tl.other if getattr(e, "kind", "") == "escalation" and e.producer != produced_by_us
            ),
            "failed_completions": sum(1 for x in tl.completed if x.producer != produced_by_us and x.outcome != "done"),
            "processes": alive,
            "workers_replaced": replaced,
            "states_equal": equal,
            "states_detail": why,
            "step_s_before": round(before, 4) if before else None,
            "step_s_during": round(during, 4) if during else None,
            "step_time_ratio": round(during / before, 3) if before and during else None,
            "accounting": ACCOUNTING,
        }
        result["failures"] = _failures(result, cfg, records, where, consumers[T.COMMANDS.name])
        result["ok"] = not result["failures"]
        return result
    finally:
        if c is not None:
            await c.stop()
        if own_stack:
            stack.stop()


def _account(
    records: list[H.Hostile],
    where: list[tuple[int, int] | None],
    errors: list[str | None],
    letter_records: list[Any],
    consumers: dict[str, set[str]],
    ns: str,
) -> dict[str, Any]:
    """Every record against the letters written for it, by (source topic, partition, offset)."""
    name_of = {T.with_namespace(t.name, ns): t.name for t in T.ALL}
    letters: dict[tuple[str, int, int], list[Any]] = defaultdict(list)
    unreadable = 0
    for rec in letter_records:
        try:
            letter = decode_dead_letter(rec.value)
        except SchemaError:
            unreadable += 1
            continue
        letters[(name_of.get(letter.topic, letter.topic), letter.partition, letter.offset)].append(letter)
    by_category: dict[str, Counter] = defaultdict(Counter)
    by_topic: dict[str, Counter] = defaultdict(Counter)
    per_consumer: dict[str, Counter] = defaultdict(Counter)
    unaccounted: list[dict[str, Any]] = []
    matched: set[tuple[str, int, int]] = set()
    for h, w, err in zip(records, where, errors):
        parts = h.category.split(":")
        cat = {"absurd": ":".join(parts[:2]), "duplicate": "duplicate"}.get(parts[0], h.category)
        by_category[cat]["tried"] += 1
        by_topic[h.topic.name]["tried"] += 1
        if w is None:
            by_category[cat]["broker_refused"] += 1
            by_topic[h.topic.name]["broker_refused"] += 1
            by_topic[h.topic.name][f"broker_refused:{err}"] += 1
            continue
        k = (h.topic.name, *w)
        got = letters.get(k, [])
        matched.add(k)
        names = Counter(x.consumer for x in got)
        want = expected_letters(h, consumers)
        for x in got:
            per_consumer[x.consumer][_reason_class(x.reason)] += 1
        ok = set(names) == want and all(v == 1 for v in names.values())
        if h.expect == H.UNTRUSTED:
            ok = ok and all(x.reason.startswith("untrusted") for x in got)
        if h.expect == H.UNAUTHENTICATED:
            ok = ok and all(x.reason.startswith("unauthenticated") for x in got)
        outcome = "dead_lettered" if got else h.expect if consumers[h.topic.name] else H.NO_CONSUMER
        by_category[cat][outcome] += 1
        by_topic[h.topic.name][outcome] += 1
        if not ok:
            unaccounted.append(
                {
                    "topic": h.topic.name,
                    "category": h.category,
                    "expect": h.expect,
                    "want": sorted(want),
                    "got": sorted(f"{x.consumer}: {x.reason[:120]}" for x in got),
                }
            )
    strays = [
        f"{k[0]}@{k[1]}:{k[2]} {x.consumer}: {x.reason[:120]}"
        for k, xs in letters.items()
        if k not in matched
        for x in xs
    ]
    return {
        "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
        "by_topic": {k: dict(v) for k, v in sorted(by_topic.items())},
        "dead_letters": sum(len(v) for v in letters.values()),
        "dead_letters_per_consumer": {k: dict(v) for k, v in sorted(per_consumer.items())},
        "unauthenticated_refusals": sum(v.get("unauthenticated", 0) for v in per_consumer.values()),
        "unreadable_letters": unreadable,
        "unaccounted": len(unaccounted),
        "unaccounted_first": unaccounted[:10],
        # letters for records that are not ours: the job's own traffic refused (a loss)
        "stray_letters": len(strays),
        "stray_letters_first": strays[:10],
    }


def _reason_class(reason: str) -> str:
    for prefix in ("unauthenticated", "untrusted", "not JSON", "expected a JSON object", "schema_version", "unknown"):
        if reason.startswith(prefix):
            return prefix.split()[0].lower()
    return reason.split(":")[0].split()[0] if reason else "empty"


def _failures(
    r: dict[str, Any], cfg: Config, records: list[H.Hostile], where: list[Any], sidecars: set[str]
) -> list[str]:
    f = []
    for what in ("incidents", "plans", "commands"):
        if r[what]:
            f.append(f"{r[what]} {what} from the control plane")
    if r["processes"]["dead"]:
        f.append(f"processes died: {r['processes']['dead']}")
    if r["workers_replaced"]:
        f.append(f"workers replaced: ranks {r['workers_replaced']}")
    if not r["states_equal"]:
        f.append(f"final state differs from the fault-free run: {r['states_detail']}")
    if not r["trained_through_burst"]:
        f.append("training ended before the burst did: raise --steps")
    if r["unaccounted"]:
        f.append(f"{r['unaccounted']} records not accounted for (first: {r['unaccounted_first'][0]})")
    if r["stray_letters"]:
        f.append(f"{r['stray_letters']} dead letters for records that were not hostile")
    if r["unreadable_letters"]:
        f.append(f"{r['unreadable_letters']} unreadable dead letters")
    # The sidecars' refusals are exact: every refused command reaches every sidecar, and each
    # refusal is one log line (it is never acked and never remembered, so a copy is refused again).
    commands = sum(
        1 for h, w in zip(records, where) if w is not None and h.topic is T.COMMANDS and h.expect == H.REFUSED
    )
    logged = {name: r["refusals_logged"].get(name, {}).get("command_refused", 0) for name in sorted(sidecars)}
    if any(n != commands for n in logged.values()):
        f.append(f"{commands} refused commands sent, the sidecars logged {logged}")
    # The planner says a word about every valid incident: a decision, a duplicate, another job's.
    delivered = [
        h
        for h, w in zip(records, where)
        if w is not None and h.topic is T.INCIDENTS and h.expect in (H.REFUSED, H.OTHER_JOB)
    ]
    said = sum(r["refusals_logged"].get("planner", {}).values())
    if said != len(delivered):
        f.append(f"{len(delivered)} valid incidents delivered, the planner logged {said} decisions about them")
    # The executor leader refuses each plan it is handed (a copy that arrives while the first
    # still waits replaces it in memory: one refusal for both).
    plans = [h for h, w in zip(records, where) if w is not None and h.topic is T.PLANS and h.expect == H.REFUSED]
    ids = {orjson.loads(h.value)["plan_id"] for h in plans}
    refused = sum(v.get("plan_refused_invalid", 0) for k, v in r["refusals_logged"].items() if k.startswith("executor"))
    if not len(ids) <= refused <= len(plans):
        f.append(f"{len(plans)} absurd plans ({len(ids)} ids) delivered, the executors refused {refused}")
    ratio = r["step_time_ratio"]
    if ratio is None or ratio > cfg.max_step_ratio:
        f.append(f"step time during the burst / before = {ratio} (limit {cfg.max_step_ratio})")
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=Config.rate, help="records per second")
    ap.add_argument("--signing", action="store_true", help="sign the bus; add forgeries (refused unauthenticated)")
    ap.add_argument("--broker-schemas", choices=["on", "off"], default="off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: long enough for the burst)")
    ap.add_argument("--max-step-ratio", type=float, default=Config.max_step_ratio)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--run-dir", default=None, help="keep the logs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    cfg = Config(
        messages=args.messages,
        rate=args.rate,
        signing=args.signing,
        broker_schemas=args.broker_schemas == "on",
        seed=args.seed,
        steps=args.steps,
        max_step_ratio=args.max_step_ratio,
    )
    configure(level="WARNING")  # not a line per hostile record the onlookers skip
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
        result = asyncio.run(run(cfg, run_dir))
    result["load_average_before"] = [round(x, 2) for x in load]
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps({k: v for k, v in result.items() if k != "accounting"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not result["ok"]:
        print(f"hostile run FAILED: {'; '.join(result['failures'])}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
