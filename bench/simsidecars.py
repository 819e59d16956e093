"""Simulated sidecars: many nodes in one asyncio process, in place of torch workers.

Each simulated node sends one NodeHeartbeat per `--interval` (1 s; at its own phase within it) with
its ranks' step, and obeys ExecutorCommands like services/sidecar/app.py does, answering at once:
pause -> one ack per node (with the in-band decision only from the nodes the command names)
with RankReports (applied_step = vote_step = current step, grads_step = None); replace -> the spare takes the assignments; recover -> acks for the stages
rebuilt, restored, resumed, verified (from the command's stage_nodes only, like the sidecar;
`rebuilt` carries the in-band decision). After `--lose-at` seconds one node stops beating (node loss); the fault time goes to
--out as JSON with what was sent.

One process stands for thousands of sidecars, so its own cost is kept off the system under
test: messages are rendered from per-node byte templates (the same JSON a sidecar's pydantic
encoder writes; tests/unit/test_simsidecars.py decodes them with the real schema) and handed to
aiokafka as per-partition batches. The batching also cuts the produce requests the local
broker sees (one per partition per flush instead of one per sidecar per second): a real
cluster's broker takes 12,500 requests/s, the 2-core dev box's tansu does not.

    python -m flashrecovery.bench.simsidecars --nodes 1250 --ranks 8 --lose-at 8 --out sim.json

Addresses come from FLASHRECOVERY_* like every service (Supervisor.env)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import SCHEMA_VERSION, CommandAction, ExecutorCommand
from flashrecovery.shared.settings import load_settings

STEP_S = 0.5  # simulated step time
FLUSH_S = 0.05  # how often due beats are handed to the broker, per partition


class SimCluster:
    def __init__(
        self,
        nodes: int,
        ranks: int,
        spares: int,
        lose: int,
        lose_at: float,
        columns: bool = True,
        interval_s: float = 1.0,
    ) -> None:
        self.s = load_settings()
        self.interval_s = interval_s  # heartbeat interval, declared in every beat as a sidecar does
        self.columns = columns  # heartbeats in the rank_columns form (sidecar heartbeat_columns)
        self.nodes, self.ranks = nodes, ranks
        self.names = [f"node-{i}" for i in range(nodes)] + [f"spare-{i}" for i in range(spares)]
        # node -> hosted ranks; the spare hosts none until a replace assigns some
        self.hosted: dict[str, list[int]] = {f"node-{i}": list(range(i * ranks, (i + 1) * ranks)) for i in range(nodes)}
        for i in range(spares):
            self.hosted[f"spare-{i}"] = []
        # rank -> its node: a replace moves ranks in O(moved), as each real sidecar handles only
        # its own command (a scan of every node per moved rank cost up to 0.1 s at 12,500 nodes,
        # charged to the replace phase of the system under test)
        self.node_of = {r: n for n, hosted in self.hosted.items() for r in hosted}
        self.dead: set[str] = set()
        self.lose, self.lose_at = f"node-{lose}", lose_at
        self.generation = 0
        self.t0 = time.monotonic()
        self.step_base = 0  # steps before the current run segment
        self.run_since: float | None = self.t0  # None while paused
        self.frozen_step = 0
        self.seq = {n: 0 for n in self.names}
        self.handled: set[str] = set()
        self.sent_beats = self.sent_acks = self.commands = 0
        self.fault_at: float | None = None
        self.lag_max = 0.0
        self.stop = asyncio.Event()
        self._acks: list[bytes] = []
        self.timeline: list[dict[str, Any]] = []
        self._raw: AIOKafkaProducer | None = None
        self._templates()

    # ------------------------------------------------------------------ the simulated step
    def step(self) -> int:
        if self.run_since is None:
            return self.frozen_step
        return self.step_base + int((time.monotonic() - self.run_since) / STEP_S)

    def pause(self) -> int:
        if self.run_since is not None:
            self.frozen_step = self.step()
            self.run_since = None
        return self.frozen_step

    def resume(self, resume_step: int) -> None:
        self.step_base, self.run_since = resume_step, time.monotonic()

    # ------------------------------------------------------------------ heartbeats
    def _templates(self) -> None:
        """Per node: the envelope's fixed part and each rank's fixed fields, as bytes."""
        job = orjson.dumps(self.s.job_id).decode()
        self._head: dict[str, bytes] = {}
        self._rank_heads: dict[str, list[bytes]] = {}
        for node in self.names:
            self._head[node] = (
                f'"schema_version":{SCHEMA_VERSION},"job_id":{job},"producer":"sim-{node}",'
                f'"kind":"node_heartbeat","node_id":"{node}","interval_s":{self.interval_s!r},'
            ).encode()
            self._rank_heads[node] = self._rank_prefixes(node)

    def _rank_prefixes(self, node: str) -> list[bytes]:
        """The fixed part of the node's ranks: one prefix per rank object, or (columns) the
        identity columns."""
        hosted = self.hosted[node]
        ids = list(enumerate(hosted)) if hosted else [(lr, None) for lr in range(self.ranks)]
        pid = [100000 + r if r is not None else 200000 + lr for lr, r in ids]
        if self.columns:
            return [
                orjson.dumps({"rank": [r for _, r in ids], "local_rank": [lr for lr, _ in ids], "pid": pid})[:-1] + b","
            ]
        return [
            f'{{"rank":{"null" if r is None else r},"local_rank":{lr},"pid":{p},'.encode()
            for (lr, r), p in zip(ids, pid)
        ]

    def beat(self, node: str) -> bytes:
        step = self.step()
        now = time.monotonic()
        since = (now - self.run_since) % STEP_S if self.run_since is not None else now - (self.t0)
        hosted = self.hosted[node]
        if hosted:
            state, t, tail = (
                ("running" if self.run_since is not None else "paused"),
                STEP_S,
                ',"role":"active","standby_ready":0}',
            )
        else:
            state, step, since, t, tail = "standby", 0, 0.0, None, f',"role":"spare","standby_ready":{self.ranks}}}'
        self.seq[node] += 1
        head = (
            f'{{"event_id":"{os.urandom(8).hex()}","generation":{self.generation},"emitted_at":{time.time()},'
            f'"seq":{self.seq[node]},'
        ).encode() + self._head[node]
        prefixes = self._rank_heads[node]
        if self.columns:
            n = len(hosted) or self.ranks

            def col(v: object) -> str:
                return "[" + ",".join([v] * n) + "]"  # type: ignore[list-item]

            body = (
                f'"state":{col(chr(34) + state + chr(34))},"step":{col(str(step))},'
                f'"step_time_s":{col("null" if t is None else str(t))},"generation":{col(str(self.generation))},'
                f'"since_progress_s":{col(f"{since:.3f}")}}}'
            ).encode()
            return b"".join((head, b'"rank_columns":', prefixes[0], body, tail.encode()))
        common = (
            f'"state":"{state}","step":{step},"step_time_s":{"null" if t is None else t},'
            f'"generation":{self.generation},"long_phase":null,"long_phase_expected_s":null,'
            f'"since_progress_s":{since:.3f}}}'
        ).encode()
        return b"".join((head, b'"ranks":[', b",".join(p + common for p in prefixes), b"]", tail.encode()))

    async def heartbeats(self, raw: AIOKafkaProducer) -> None:
        """Each node beats once an interval at its own phase; due beats go out every FLUSH_S as one
        batch per partition, on the partition the node's key maps to (as bus.Producer does)."""
        topic = busmod.topic_name(T.HEARTBEATS, self.s.bus)
        parts = sorted(await raw.partitions_for(topic))
        pick = DefaultPartitioner()
        part_of = {node: pick(node.encode(), parts, parts) for node in self.names}
        n = len(self.names)
        cursor = 0
        while not self.stop.is_set():
            now = time.monotonic() - self.t0
            if self.fault_at is None and now >= self.lose_at:
                self.dead.add(self.lose)
                self.fault_at = time.time()
            batches: dict[int, Any] = {}
            while True:
                sec, i = divmod(cursor, n)
                due = (sec + i / n) * self.interval_s
                if due > now:
                    break
                cursor += 1
                node = self.names[i]
                if node in self.dead:
                    continue
                p = part_of[node]
                batch = batches.get(p) or batches.setdefault(p, raw.create_batch())
                if batch.append(key=node.encode(), value=self.beat(node), timestamp=None) is None:
                    await raw.send_batch(batch, topic, partition=p)  # full: send it, start another
                    batch = batches[p] = raw.create_batch()
                    batch.append(key=node.encode(), value=self.beat(node), timestamp=None)
                self.sent_beats += 1
                self.lag_max = max(self.lag_max, now - due) if sec >= 2 else self.lag_max
            for p, batch in batches.items():
                await raw.send_batch(batch, topic, partition=p)
            await asyncio.sleep(FLUSH_S)

    # ------------------------------------------------------------------ commands
    async def on_command(self, cmd: ExecutorCommand, record) -> None:
        if cmd.job_id != self.s.job_id or cmd.command_id in self.handled or cmd.generation < self.generation:
            return
        self.handled.add(cmd.command_id)
        self.commands += 1
        got = time.time()
        self.generation = max(self.generation, cmd.generation)
        addressed = None if cmd.nodes is None else set(cmd.nodes)
        targets = [n for n in self.names if n not in self.dead and (addressed is None or n in addressed)]
        # With the in-band decision only the named nodes report (a sidecar does the same).
        named = None if cmd.stage_nodes is None else set(cmd.stage_nodes)
        if cmd.action is CommandAction.PAUSE:
            step = self.pause()
            kill = set(cmd.kill_ranks)
            for n in targets if named is None else [n for n in targets if n in named]:
                if self.hosted[n]:
                    self.ack(
                        cmd,
                        n,
                        "done",
                        [
                            {"rank": r, "pid": 100000 + r, "applied_step": step, "grads_step": None, "vote_step": step}
                            for r in self.hosted[n]
                            if r not in kill
                        ],
                    )
        elif cmd.action is CommandAction.REPLACE:
            by_node: dict[str, list[Any]] = {}
            for a in cmd.assignments:
                by_node.setdefault(a.node_id, []).append(a)
            for n in targets:
                mine = by_node.get(n, [])
                self.hosted[n] = sorted(set(self.hosted[n]) | {a.rank for a in mine})
                for a in mine:  # the ranks left the node they were on
                    other = self.node_of.get(a.rank)
                    if other is not None and other != n:
                        self.hosted[other].remove(a.rank)
                        self._rank_heads[other] = self._rank_prefixes(other)
                    self.node_of[a.rank] = n
                self._rank_heads[n] = self._rank_prefixes(n)
                self.ack(cmd, n, "done", [{"rank": a.rank, "pid": 100000 + a.rank} for a in mine])
        elif cmd.action is CommandAction.RECOVER:
            # In-band: every simulated rank paused between steps at the frozen step, so the
            # reduction the real ranks run (commit_rule.decide_in_band) resumes at the next.
            resume = self.frozen_step + 1 if cmd.in_band else cmd.resume_step or 0
            decided = {"commit_step": None, "resume_step": resume, "computed_step": resume - 1} if cmd.in_band else {}
            live = [n for n in targets if self.hosted[n]]
            staged = live if named is None else [n for n in live if n in named]
            for stage in ("rebuilt", "restored", "resumed"):
                for n in staged:
                    self.ack(
                        cmd,
                        n,
                        stage,
                        [
                            {"rank": r, "pid": 100000 + r, "phase": stage, "seconds": 0.0}
                            | (decided if stage == "rebuilt" else {})
                            for r in self.hosted[n]
                        ],
                    )
            self.resume(resume)
            for n in staged:
                self.ack(
                    cmd, n, "verified", [{"rank": r, "pid": 100000 + r, "applied_step": resume} for r in self.hosted[n]]
                )
        elif cmd.action is CommandAction.STOP:
            for n in targets:
                self.ack(cmd, n)
        count, built = len(self._acks), time.time()
        await self.flush_acks()
        handed = time.time()
        await asyncio.gather(*getattr(self, "_delivered", ()), return_exceptions=True)
        # where a phase's time goes: command emitted -> received here -> acks built -> handed over
        self.timeline.append(
            {
                "action": str(cmd.action),
                "emitted_at": cmd.emitted_at,
                "received_at": got,
                "acks": count,
                "acks_built_at": built,
                "acks_sent_at": handed,
                "acks_stored_at": time.time(),
            }
        )

    def ack(self, cmd: ExecutorCommand, node: str, stage: str = "done", ranks: list[dict] | None = None) -> None:
        """A CommandAck as the sidecar's encoder writes it, queued for flush_acks()."""
        self._acks.append(
            orjson.dumps(
                {
                    "event_id": os.urandom(8).hex(),
                    "schema_version": SCHEMA_VERSION,
                    "job_id": self.s.job_id,
                    "generation": cmd.generation,
                    "emitted_at": time.time(),
                    "producer": f"sim-{node}",
                    "kind": "command_ack",
                    "command_id": cmd.command_id,
                    "plan_id": cmd.plan_id,
                    "incident_id": cmd.incident_id,
                    "action": str(cmd.action),
                    "node_id": node,
                    "ok": True,
                    "stage": stage,
                    "detail": "",
                    **self._reports(ranks or []),
                }
            )
        )
        self.sent_acks += 1

    def _reports(self, ranks: list[dict]) -> dict[str, Any]:
        """Per-rank reports as a sidecar with rank_columns writes them (report_columns), or as
        one object per rank."""
        if not self.columns or not ranks:
            return {"ranks": ranks}
        return {"report_columns": {f: [r.get(f) for r in ranks] for f in ranks[0]}}

    async def flush_acks(self) -> None:
        topic = busmod.topic_name(T.ACKS, self.s.bus)
        key = self.s.job_id.encode()  # acks are keyed by job (topics.ACKS)
        batch = self._raw.create_batch()
        delivered = []
        for value in self._acks:
            if batch.append(key=key, value=value, timestamp=None) is None:
                delivered.append(await self._raw.send_batch(batch, topic, partition=0))
                batch = self._raw.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        if self._acks:
            delivered.append(await self._raw.send_batch(batch, topic, partition=0))
        self._acks.clear()
        self._delivered = delivered  # the broker's acknowledgements (flush_acks' caller awaits)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, seconds: float, out: Path) -> None:
        self.producer = busmod.Producer(self.s.kafka_bootstrap, self.s.bus, "sim-sidecars")
        await self.producer.start()
        raw = self._raw = AIOKafkaProducer(bootstrap_servers=self.s.kafka_bootstrap, acks=1, max_batch_size=1 << 20)
        await raw.start()
        consumer = busmod.Consumer(
            self.s.kafka_bootstrap,
            self.s.bus,
            [T.COMMANDS],
            None,
            self.on_command,
            self.producer,
            "sim-sidecars",
            from_latest=True,
        )
        await consumer.start()
        ctask = asyncio.create_task(consumer.run())
        await consumer.wait_assigned()
        self.t0 = self.run_since = time.monotonic()
        out.with_suffix(".ready").write_text("1")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        hb = asyncio.create_task(self.heartbeats(raw))
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass
        self.stop.set()
        await hb
        consumer.stop()
        await asyncio.gather(ctask, return_exceptions=True)
        await self.producer.stop()
        await raw.stop()
        out.write_text(
            json.dumps(
                {
                    "fault_at": self.fault_at,
                    "lost_node": self.lose,
                    "sent_heartbeats": self.sent_beats,
                    "sent_acks": self.sent_acks,
                    "commands": self.commands,
                    "heartbeat_lag_max_s": round(self.lag_max, 3),
                    "command_timeline": self.timeline,
                    "seconds": round(time.monotonic() - self.t0, 2),
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--spares", type=int, default=1)
    ap.add_argument("--lose", type=int, default=None, help="node index to lose (default: nodes // 3)")
    ap.add_argument("--lose-at", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--interval", type=float, default=1.0, help="heartbeat interval of every node, s")
    ap.add_argument(
        "--rank-objects", action="store_true", help="heartbeats with one object per rank instead of rank_columns"
    )
    args = ap.parse_args()
    sim = SimCluster(
        args.nodes,
        args.ranks,
        args.spares,
        args.nodes // 3 if args.lose is None else args.lose,
        args.lose_at,
        columns=not args.rank_objects,
        interval_s=args.interval,
    )
    asyncio.run(sim.run(args.seconds, args.out))


if __name__ == "__main__":
    main()
