"""The detector's shell: the only part that touches Kafka and Redis. It reads heartbeats and
worker events, feeds them to the pure core with its own receive clock, runs the core's periodic
tick, publishes what the core decides and logs one line per decision."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from flashrecovery.shared import metrics as M
from flashrecovery.shared import topics as T
from flashrecovery.shared.bus import Consumer, Producer, topic_name
from flashrecovery.shared.logging import get_logger
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.schemas import NodeHeartbeat, NodeRole
from flashrecovery.shared.settings import Settings

from . import core
from .state import DetectorState

GROUP_ID = "flashrecovery-detector"
TICK_S = 0.1
LIVENESS_S = 2.0
LIVENESS_TTL_S = 10.0
LAG_LIMIT_S = 1.0  # consumer lag beyond which time-driven checks wait
STALL_FACTOR = 1.5  # no batch at all for this many heartbeat intervals: the consumer is stalled
PEER_LOOKBACK_S = 300.0  # a (re)started instance learns the incidents of the last 5 minutes
PEER_GRACE_S = 1.0  # while others own part of the job, a hang waits this long for their incident
HANDOVER_PATIENCE_S = 10.0  # how long seeding handed-over nodes waits to hear the job at all
TOPOLOGY_POLL_S = 1.0  # how often the registry's view of the job (core.Topology) is re-read


class ReceiveClock:
    """Wall-clock seconds that do not jitter: anchored to time.time(), advanced by the monotonic
    clock, so intervals between incident times stay exact. Re-anchored when the wall clock
    stepped more than MAX_SKEW_S away (NTP after a VM pause or a clock fix): other processes
    stamp with time.time(), and the executor's RTO is its own time.time() minus an incident's
    first_seen_at; without it a 17.6 s wall-clock step stayed in every RTO of a run (seen
    2026-12-01: RTO 17.6 s while every phase summed to 0.37 s)."""

    MAX_SKEW_S = 1.0

    def __init__(self, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self._wall, self._mono = wall, mono
        self._wall0, self._mono0 = wall(), mono()

    def __call__(self) -> float:
        now, wall = self._wall0 + (self._mono() - self._mono0), self._wall()
        if abs(wall - now) > self.MAX_SKEW_S:
            self._wall0, self._mono0 = wall, self._mono()
            return wall
        return now


class DetectorService:
    def __init__(
        self,
        settings: Settings,
        instance: str | None = None,
        clock: ReceiveClock | None = None,
        peer_incidents: bool = True,
    ) -> None:
        self.settings = settings
        # FLASHRECOVERY_INSTANCE names it, like every other service: its liveness key is
        # alive:detector:<instance> (scaled out, give each replica its own, e.g. the pod name).
        self.instance = instance or settings.instance
        self.cfg = core.Config.from_settings(settings.detector, producer=f"detector/{self.instance}")
        self.state = DetectorState()
        self.clock = clock or ReceiveClock()
        self.log = get_logger("detector", instance=self.instance)
        self.published: list[Any] = []  # incidents and degradations sent (tests, bench, metrics)
        self._stop = asyncio.Event()
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        # Reads the incidents topic (every partition, no group, no commits) so root causes
        # reported by the other instances explain symptoms held here.
        self._peers: Consumer | None = None
        self._peer_incidents = peer_incidents
        self._registry: Registry | None = None
        self._assigned: set[Any] = set()
        self._owned: set[int] = set()  # heartbeat partitions owned after the last rebalance
        self._handover: set[int] = set()  # newly owned partitions whose nodes are still to seed
        self._handover_nodes: list[tuple[str, tuple[tuple[int, int], ...]]] | None = None
        self._handover_at = 0.0
        self._lag: dict[tuple[str, int], tuple[float, float]] = {}  # tp -> (measured at, lag s)
        self._caught_up_at = self.clock()
        self.frozen_ticks = 0
        self._partitioner = DefaultPartitioner()  # what bus.Producer uses to place node keys
        # The registry's view of the job that every worker event is checked against (core.admit);
        # None while there is none (no registry, or the job not registered): nothing is checked.
        self.topology: core.Topology | None = None
        self._topology_version: bytes | None = None
        self.refused = 0  # worker events refused by core.admit (dead-lettered with the reason)

    @property
    def group_id(self) -> str:
        """One consumer group per topic namespace: side-by-side jobs on a broker stay apart."""
        return T.with_namespace(GROUP_ID, self.settings.bus.topic_namespace)

    async def start(self) -> None:
        s = self.settings
        if not s.kafka_bootstrap:
            raise ValueError("kafka_bootstrap is not set")
        self._producer = Producer(s.kafka_bootstrap, s.bus, client_id=f"detector-{self.instance}")
        await self._producer.start()
        self._consumer = Consumer(
            s.kafka_bootstrap,
            s.bus,
            [T.HEARTBEATS, T.WORKER_EVENTS],
            self.group_id,
            self._handle_one,
            self._producer,
            "detector",
            batch_handler=self._handle_batch,
        )
        await self._consumer.start()
        if self._peer_incidents:
            await self._start_peer_reader()
        if s.redis_url:
            self._registry = Registry.from_url(s.redis_url, s.job_id)
            await self._read_topology()
        self.log.info("detector_started", job_id=s.job_id, group=self.group_id, signatures=len(self.cfg.catalog or ()))

    async def _start_peer_reader(self) -> None:
        s = self.settings
        assert self._producer is not None
        self._peers = Consumer(
            s.kafka_bootstrap,
            s.bus,
            [T.INCIDENTS],
            None,
            self._handle_peer,
            self._producer,
            "detector-peers",
            dead_letters=False,
        )
        await self._peers.start()
        since_ms = int((time.time() - PEER_LOOKBACK_S) * 1000)
        try:
            await self._peers.wait_assigned(10.0)
            await self._peers.seek_to_time(since_ms)
        except Exception as exc:  # noqa: BLE001 - from the start instead; old records are skipped
            self.log.warning("peer_seek_failed", error=repr(exc))

    async def wait_assigned(self, timeout_s: float = 30.0) -> None:
        assert self._consumer is not None, "start() first"
        await self._consumer.wait_assigned(timeout_s)

    async def run(self) -> None:
        assert self._consumer is not None, "start() first"
        tasks = [
            asyncio.create_task(self._consumer.run(), name="detector-consume"),
            asyncio.create_task(self._tick_loop(), name="detector-tick"),
            asyncio.create_task(self._liveness_loop(), name="detector-liveness"),
            asyncio.create_task(self._topology_loop(), name="detector-topology"),
        ]
        if self._peers is not None:
            tasks.append(asyncio.create_task(self._peers.run(), name="detector-peers"))
        try:
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            self._stop.set()
            self._consumer.stop()
            if self._peers is not None:
                self._peers.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Stop consuming (the consumer commits what it handled) and flush what was produced."""
        self._stop.set()
        if self._consumer is not None:
            self._consumer.stop()
        if self._peers is not None:
            self._peers.stop()
        await asyncio.sleep(0)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._registry is not None:
            await self._registry.close()
            self._registry = None

    # ------------------------------------------------------------------ handlers
    async def _handle_one(self, event: Any, record: Any) -> None:
        await self._handle_batch([(event, record)])

    async def _handle_batch(self, batch: list[tuple[Any, Any]]) -> None:
        now = self.clock()
        M.HEARTBEATS_RECEIVED.inc(sum(1 for event, _ in batch if isinstance(event, NodeHeartbeat)))
        topo = self.topology
        verdicts = [core.admit(event, topo) for event, _ in batch] if topo is not None else [None] * len(batch)
        if self._registry is not None and any(verdicts):
            # The registry may have moved on since the last read (a fence bumps the generation
            # just before the sidecars hear of it): one read per batch that holds a refusal.
            await self._read_topology()
            verdicts = [why and core.admit(event, self.topology) for (event, _), why in zip(batch, verdicts)]
        trusted = [r for (_, r), why in zip(batch, verdicts) if why is None]
        if trusted:
            record = trusted[-1]
            newest = max(r.timestamp for r in trusted) / 1000.0
            # How far behind the stream this batch is. The newest record's timestamp of a batch
            # from many senders: one sender's slow clock cannot make us look behind (nor can
            # refused records: their timestamps are whatever their sender chose).
            self._lag[(record.topic, record.partition)] = (now, now - newest)
        decisions: list[core.Decision] = []
        for (event, record), why in zip(batch, verdicts):
            if why is not None:
                await self._refuse(event, record, why)
                continue
            try:
                _, ds = core.observe(self.state, event, now, self.cfg)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the detector
                self.log.warning("observe_failed", error=repr(exc), topic=record.topic, offset=record.offset)
                assert self._producer is not None
                await self._producer.dead_letter(record, f"detector failed: {exc!r}", "detector")
                continue
            decisions.extend(ds)
        if decisions:
            await self._publish(decisions)  # before the batch's offsets are committed

    async def _refuse(self, event: Any, record: Any, why: str) -> None:
        """A worker event the registry's topology rules out: counted, dead-lettered with the
        reason, and never seen by the core."""
        self.refused += 1
        self.state.count("untrusted_events")
        if self.refused <= 10 or self.refused & (self.refused - 1) == 0:  # 1..10, then powers of 2
            self.log.warning(
                "event_refused",
                reason=why,
                kind=getattr(event, "kind", None),
                topic=record.topic,
                offset=record.offset,
                refused=self.refused,
            )
        assert self._producer is not None
        await self._producer.dead_letter(record, f"untrusted: {why}", "detector")

    async def _read_topology(self) -> None:
        """core.Topology from the registry: generation and world size every time, the node names
        only when the topology version moved. Redis unreachable: the last view stays."""
        assert self._registry is not None
        reg = self._registry
        try:
            gen, world, version = await reg.admission_view()
            if gen is None or world is None:
                self.topology = None
                return
            nodes = self.topology.nodes if self.topology is not None else None
            if nodes is None or version is None or version != self._topology_version:
                nodes = await reg.node_ids()
                self._topology_version = version
        except Exception as exc:  # noqa: BLE001 - temporary; checked against the last view meanwhile
            self.log.warning("topology_read_failed", error=repr(exc))
            return
        self.topology = core.Topology(job_id=self.settings.job_id, generation=gen, world_size=world, nodes=nodes)

    async def _topology_loop(self) -> None:
        while not self._stop.is_set():
            if self._registry is not None:
                await self._read_topology()
            try:
                await asyncio.wait_for(self._stop.wait(), TOPOLOGY_POLL_S)
            except TimeoutError:
                pass

    async def _handle_peer(self, event: Any, record: Any) -> None:
        """An incident (or degradation) on the incidents topic, ours or a peer's: the core keeps
        the peers' root incidents as known root causes. Never dead-lettered or retried here."""
        if record.timestamp < (time.time() - PEER_LOOKBACK_S) * 1000:
            return  # history from before the lookback (the seek was not available)
        try:
            _, decisions = core.observe_incident(self.state, event, self.clock(), self.cfg)
        except Exception as exc:  # noqa: BLE001 - a bad peer record must not stop the reader
            self.log.warning("peer_incident_failed", error=repr(exc), offset=record.offset)
            return
        if decisions:
            await self._publish(decisions)

    def _check_ownership(self) -> None:
        """After a rebalance, drop the nodes whose partitions went to another instance."""
        assert self._consumer is not None
        assigned = self._consumer._c.assignment()  # see docs/detector.md: bus lacks a hook
        if assigned == self._assigned:
            return
        self._assigned = set(assigned)
        hb = topic_name(T.HEARTBEATS, self.settings.bus)
        owned = {tp.partition for tp in assigned if tp.topic == hb}
        if not owned and not assigned:
            return  # mid-rebalance: nothing assigned yet, keep state until we know
        partitions = list(range(self.settings.bus.telemetry_partitions))
        part = self._partitioner

        def keep(node_id: str) -> bool:
            return part(node_id.encode(), partitions, partitions) in owned

        released = core.release_nodes(self.state, keep)
        shared = self._peers is not None and len(owned) < len(partitions)
        self.cfg = dataclasses.replace(self.cfg, peer_grace_s=PEER_GRACE_S if shared else 0.0)
        newly = owned - self._owned
        self._owned = owned
        self._handover = (self._handover & owned) | newly
        self._handover_nodes = None
        self._handover_at = self.clock()
        self.log.info(
            "partitions_assigned", partitions=sorted(owned), released_nodes=released, new_partitions=sorted(newly)
        )

    async def _seed_handover(self) -> None:
        """Nodes on partitions taken over from another instance (the group had committed
        offsets there) may have died just before the handover: their last beats were read by
        the old owner, so this instance would never hear of them. Expect them from the registry
        topology; the core reports one lost if it does not beat after the usual misses."""
        if self._registry is None:
            self._handover.clear()
            return
        parts = sorted(self._handover)
        if self._handover_nodes is None:
            hb = topic_name(T.HEARTBEATS, self.settings.bus)
            try:
                assert self._consumer is not None
                c = self._consumer._c  # see _check_ownership: bus has no hook for this
                handed = [
                    p for p in parts if await asyncio.wait_for(c.committed(TopicPartition(hb, p)), 2.0) is not None
                ]
                snap = await asyncio.wait_for(self._registry.snapshot(), 2.0) if handed else None
            except LookupError:
                snap, handed = None, []  # no topology for the job: nothing to expect
            except Exception as exc:  # noqa: BLE001 - best effort; the next beat still teaches us
                self.log.warning("handover_seed_failed", partitions=parts, error=repr(exc))
                self._handover.clear()
                return
            self._handover_nodes = [] if snap is None else self._handover_candidates(snap, set(handed))
        if not self._handover_nodes:
            self._handover.clear()
            return
        seeded = core.expect_nodes(self.state, self.settings.job_id, self._handover_nodes, self.clock(), self.cfg)
        if seeded is None and self.clock() - self._handover_at < HANDOVER_PATIENCE_S:
            return  # the job is not heard here yet: try again next tick
        self.log.info(
            "handover_nodes_expected",
            job_id=self.settings.job_id,
            partitions=parts,
            candidates=len(self._handover_nodes),
            seeded=seeded or 0,
            reason="seeded" if seeded is not None else "job not heard: nothing expected",
        )
        self._handover.clear()
        self._handover_nodes = None

    def _handover_candidates(self, snap: Any, parts: set[int]) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
        """Active nodes of the registry topology that hold ranks and key onto `parts`."""
        partitions = list(range(self.settings.bus.telemetry_partitions))
        local = {r.rank: r.local_rank for r in snap.ranks}
        out = []
        for node in snap.nodes:
            if node.role is not NodeRole.ACTIVE or not node.ranks:
                continue
            if self._partitioner(node.node_id.encode(), partitions, partitions) not in parts:
                continue
            out.append((node.node_id, tuple((r, local.get(r, i)) for i, r in enumerate(node.ranks))))
        return out

    def _stream_now(self) -> float:
        """The clock time-driven checks may use. While the consumer is behind the stream,
        silence is not evidence (the beats may be unread), so the clock stands still at the last
        moment we were caught up, and moves on once we are again."""
        now = self.clock()
        behind = any(lag > LAG_LIMIT_S and now - at < 2.0 for at, lag in self._lag.values())
        # Nothing at all from any partition for a while: our consumer is stalled (a rebalance,
        # a broker hiccup), not every node dead at once.
        last = max((at for at, _ in self._lag.values()), default=None)
        if last is not None and now - last > STALL_FACTOR * self.cfg.heartbeat_interval_s:
            behind = True
        if not behind:
            self._caught_up_at = now
            return now
        self.frozen_ticks += 1
        return self._caught_up_at

    async def _tick_loop(self) -> None:
        while not self._stop.is_set():
            self._check_ownership()
            if self._handover:
                await self._seed_handover()
            _, decisions = core.tick(self.state, self._stream_now(), self.cfg)
            if decisions:
                await self._publish(decisions)
            try:
                await asyncio.wait_for(self._stop.wait(), TICK_S)
            except TimeoutError:
                pass

    async def _liveness_loop(self) -> None:
        while not self._stop.is_set():
            if self._registry is not None:
                try:
                    await self._registry.heartbeat_liveness("detector", self.instance, LIVENESS_TTL_S)
                except Exception as exc:  # noqa: BLE001 - Redis down is temporary; keep detecting
                    self.log.warning("liveness_failed", error=repr(exc))
            try:
                await asyncio.wait_for(self._stop.wait(), LIVENESS_S)
            except TimeoutError:
                pass

    async def _publish(self, decisions: list[core.Decision]) -> None:
        assert self._producer is not None
        for d in decisions:
            fields = dict(
                job_id=d.job_id,
                generation=d.generation,
                reason=d.reason,
                incident_id=d.incident_id,
                node_id=d.node_id,
                fault_class=d.fault_class.value if d.fault_class else None,
            )
            if d.kind == "noted":  # a peer's incident is a known root cause here
                self.log.info("peer_incident", **fields)
                continue
            if d.event is None:
                self.log.debug(f"detector_{d.kind}", **fields)
                continue
            if d.kind == "incident":
                inc = d.event
                await self._producer.publish(inc, wait=True)
                self.log.info(
                    "incident",
                    action=inc.action.value,
                    nodes=list(inc.root_cause_nodes),
                    ranks=list(inc.root_cause_ranks),
                    confidence=inc.confidence,
                    symptoms=inc.symptoms_attributed,
                    latency_s=round(inc.detected_at - inc.first_seen_at, 3),
                    **fields,
                )
                M.INCIDENTS.labels(M.label(inc.fault_class), M.label(inc.action)).inc()
                M.DETECTION_LATENCY.labels(M.label(inc.fault_class)).observe(
                    max(0.0, inc.detected_at - inc.first_seen_at)
                )
            else:
                await self._producer.publish(d.event)
                self.log.info(d.kind, **fields)
                if d.kind == "degradation":
                    M.DEGRADATIONS.labels(M.label(d.fault_class)).inc()
            self.published.append(d.event)


async def main(settings: Settings) -> None:
    """Run one detector until SIGTERM / SIGINT; the embedded stack fills in a missing broker."""
    import signal
    from pathlib import Path

    from flashrecovery.shared.bus import ensure_topics
    from flashrecovery.shared.logging import configure
    from flashrecovery.shared.stack import start_stack

    configure(settings.log_format)
    M.serve(settings.metrics_port, settings.metrics_host)
    stack = None
    if not settings.kafka_bootstrap or not settings.redis_url:
        stack = start_stack(Path(settings.runtime_dir), settings.kafka_bootstrap, settings.redis_url)
        settings = settings.model_copy(update={"kafka_bootstrap": stack.kafka_bootstrap, "redis_url": stack.redis_url})
    try:
        await ensure_topics(settings.kafka_bootstrap, settings.bus)
        service = DetectorService(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(service.stop()))
        await service.start()
        try:
            await service.run()
        finally:
            await service.close()
    finally:
        if stack is not None:
            stack.stop()
