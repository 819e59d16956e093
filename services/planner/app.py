"""The planner's I/O shell: incidents in from Kafka, registry reads and writes in Redis, plans out.
All decisions are in core.plan; this module only gathers its inputs and acts on its output."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

from pydantic import ValidationError

from flashrecovery.shared import metrics as M
from flashrecovery.shared import topics
from flashrecovery.shared.bus import Consumer, Producer
from flashrecovery.shared.keys import PLAN_ID_PREFIX
from flashrecovery.shared.logging import get_logger
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.schemas import Escalation, Fallback, FaultIncident, RecoveryPlan, encode
from flashrecovery.shared.settings import Settings
from flashrecovery.shared.topology import TOPOLOGY_VERSION, meta_ints

from .arrays import ROLE_ACTIVE, ROLE_QUARANTINED, ROLE_SPARE, PlanInput
from .core import Decision, NoPlan, Policy, incident_refusal, known_incident_refusal, plan, plan_id_for

GROUP = "flashrecovery-planner"
SERVICE = "planner"
TOPOLOGY_POLL_S = 1.0  # how soon after a topology change the warm copy is rebuilt


class PlannerService:
    def __init__(self, settings: Settings) -> None:
        if not settings.kafka_bootstrap or not settings.redis_url:
            raise ValueError("planner needs FLASHRECOVERY_KAFKA_BOOTSTRAP and FLASHRECOVERY_REDIS_URL")
        self.settings = settings
        self.instance = str(getattr(settings, "instance", "0"))
        self.policy = Policy.from_settings(settings.planner)
        self.registry = Registry.from_url(settings.redis_url, settings.job_id)
        self.producer = Producer(settings.kafka_bootstrap, settings.bus, client_id="planner")
        self.consumer = Consumer(
            settings.kafka_bootstrap, settings.bus, [topics.INCIDENTS], GROUP, self.handle, self.producer, SERVICE
        )
        self.log = get_logger(SERVICE, job_id=settings.job_id, instance=self.instance)
        self.decisions: list[dict[str, Any]] = []  # what was decided, newest last (tests, probes)
        self._live: asyncio.Task[None] | None = None
        self._warm: asyncio.Task[None] | None = None
        self._topology: tuple[bytes, PlanInput] | None = None  # (topology_version, arrays)

    async def start(self, wait_assigned_s: float | None = 30.0) -> None:
        await self.producer.start()
        await self.consumer.start()
        await self.registry.heartbeat_liveness(SERVICE, self.instance)
        self._live = asyncio.create_task(self._liveness())
        self._warm = asyncio.create_task(self._keep_topology_warm())
        if wait_assigned_s:
            await self.consumer.wait_assigned(wait_assigned_s)
        self.log.info("planner_started", policy=self.policy.__dict__)

    async def run(self) -> None:
        await self.consumer.run()

    async def stop(self) -> None:
        self.consumer.stop()
        for task in (self._live, self._warm):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def close(self) -> None:
        """After run() returned: drain the producer, drop the connections."""
        await self.producer.stop()
        await self.registry.close()

    async def _liveness(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                await self.registry.heartbeat_liveness(SERVICE, self.instance)

    # ---------------------------------------------------------------- one incident
    async def handle(self, event: Any, record: Any) -> None:
        if not isinstance(event, FaultIncident):
            return  # degradations and anything else on the topic are not the planner's
        log = self.log.bind(incident_id=event.incident_id, event_generation=event.generation)
        if event.job_id != self.settings.job_id:
            log.info("incident_ignored", reason=f"other job {event.job_id}")
            return
        reg = self.registry
        envelope_id = event.event_id
        # Marked handled only once the decision is out: a planner killed half-way (after the
        # incident transition, before publishing the plan) plans again on redelivery; the plan
        # id is derived from the incidents, so a replayed decision is the same plan.
        if await reg.handled(SERVICE, event.event_id):
            log.info("incident_duplicate", reason="event already handled")
            return
        now = time.time()
        generation = await reg.generation()
        refusal = incident_refusal(event, self.settings.job_id, generation)
        if refusal is not None and generation >= 0:  # -1: no topology (escalated below)
            self._decided(
                log,
                "incident_refused",
                None,
                generation,
                (refusal,),
                level="warning",
                refused_event=event.event_id[:100],
            )
            await reg.mark_handled(SERVICE, envelope_id)
            return
        if event.generation < generation:
            # Still a real fault: a node lost in generation g is lost in g+1 too.
            log.info("incident_older_generation", registry_generation=generation)
        ok, why = await reg.incident_transition(
            event.incident_id, None, "planned", generation, incident=encode(event), detected_at=event.detected_at
        )
        if not ok:
            known = await reg.incident(event.incident_id)
            refusal = known_incident_refusal(known)
            if refusal is not None:
                # Not planned again: by the incident's identity, whatever the envelope says.
                self._decided(
                    log,
                    "incident_known",
                    known.get("plan_id"),
                    max(generation, 0),
                    (f"{why}: {refusal}",),
                    duplicate_event=event.event_id,
                )
                await reg.mark_handled(SERVICE, event.event_id)
                return
            log.info("incident_known", reason=why, action="plan again: its plan never got out")
            if known.get("incident"):
                # The registry's copy is the incident; a new envelope cannot change what it says.
                try:
                    event = FaultIncident.model_validate_json(known["incident"])
                except ValidationError as exc:
                    log.warning("known_incident_unreadable", error=str(exc)[:300])
        snapshot = await self._plan_input()
        if snapshot is None:
            # Nothing to plan from: Redis restarted empty (the registry is not persisted) or the
            # job never registered. Either way no recovery can follow, so say it loudly.
            reason = f"registry has no topology for job {self.settings.job_id}: lost or never registered"
            esc = Escalation(
                event_id=plan_id_for(self.settings.job_id, (event.incident_id,), -1).replace(PLAN_ID_PREFIX, "esc-"),
                job_id=self.settings.job_id,
                generation=event.generation,
                producer=SERVICE,
                incident_ids=(event.incident_id,),
                reason=reason,
            )
            await self._escalate(esc, log)
            self._decided(log, "escalation", None, max(generation, 0), (reason,), level="error")
            return
        await self._record_faults(event, snapshot.node_index)
        open_incidents = await self._open_incidents(event)
        history = await self._fault_history(open_incidents, now)
        active = await self._active_plan(open_incidents)
        decision = plan(snapshot, open_incidents, self.policy, now, fault_history=history, active_plan=active)
        await self._act(decision, event, snapshot.generation, log)
        await reg.mark_handled(SERVICE, envelope_id)

    async def _plan_input(self) -> PlanInput | None:
        """The registry snapshot as arrays, without a pydantic object per rank (the fast path at
        100k ranks): the warm copy with fresh meta while the topology version has not moved,
        else a full read."""
        meta = await self.registry.meta()
        if not meta:
            return None
        version = meta.get(TOPOLOGY_VERSION.encode())
        if self._topology is not None and version is not None and self._topology[0] == version:
            # The records are those of the copy (every write of them moves the version); the
            # rest of meta (generation, committed step) is read fresh.
            m = meta_ints(meta)
            return dataclasses.replace(
                self._topology[1], generation=m["generation"], committed_step=m.get("committed_step", -1)
            )
        return await self._read_topology()

    async def _read_topology(self) -> PlanInput | None:
        """meta, rank and node records in one MULTI, kept as the warm copy."""
        meta, ranks, nodes = await self.registry.topology_rows()
        if not meta:
            return None
        inp = PlanInput.from_rows(self.settings.job_id, meta, ranks.values(), nodes.values())
        self._record_pool(inp)
        version = meta.get(TOPOLOGY_VERSION.encode())
        self._topology = None if version is None else (version, inp)
        return inp

    @staticmethod
    def _record_pool(inp: PlanInput) -> None:
        """The standby pool (free slots on spare nodes) and the nodes by role, for the metrics."""
        spare = inp.node_role == ROLE_SPARE
        M.STANDBY_POOL.set(int(inp.node_slots[spare].sum()))
        for role, code in (("active", ROLE_ACTIVE), ("spare", ROLE_SPARE), ("quarantined", ROLE_QUARANTINED)):
            M.NODES.labels(role).set(int((inp.node_role == code).sum()))

    async def _keep_topology_warm(self) -> None:
        """Parsing 100k rank records takes ~1 s on a loaded 2-core box: do it when the topology
        changes (after a recovery), not when the next incident arrives."""
        while True:
            with contextlib.suppress(Exception):
                version = await self.registry.topology_version()
                if version is not None and (self._topology is None or self._topology[0] != version):
                    await self._read_topology()
            await asyncio.sleep(TOPOLOGY_POLL_S)

    async def _record_faults(self, inc: FaultIncident, known: dict[str, int]) -> None:
        """Each node's faults, keyed by incident id (a replay adds nothing), trimmed to the
        quarantine window. Only the topology's nodes (`known`): an incident naming 10,000 nodes
        that do not exist must not create a key for each."""
        await self.registry.record_node_faults(
            (n for n in inc.root_cause_nodes if n in known),
            inc.incident_id,
            inc.detected_at,
            self.policy.quarantine_window_s,
        )

    async def _fault_history(self, incidents: list[FaultIncident], now: float) -> dict[str, dict[str, float]]:
        nodes = sorted({n for i in incidents for n in i.root_cause_nodes})
        return await self.registry.node_fault_history(nodes, now - self.policy.quarantine_window_s)

    async def _open_incidents(self, current: FaultIncident) -> list[FaultIncident]:
        out = {current.incident_id: current}
        for iid in await self.registry.open_incidents():
            if iid in out:
                continue
            raw = (await self.registry.incident(iid)).get("incident")
            if not raw:
                continue
            try:
                inc = FaultIncident.model_validate_json(raw)
            except ValidationError as exc:
                self.log.warning("open_incident_unreadable", incident_id=iid, error=str(exc))
                continue
            out[iid] = inc
        return list(out.values())

    async def _active_plan(self, open_incidents: list[FaultIncident]) -> RecoveryPlan | None:
        """The plan the executor is driving, if any of its incidents is still open."""
        pid = await self.registry.active_plan_id()
        if not pid:
            return None
        raw = await self.registry.get_plan(pid)
        if raw is None:
            return None
        active = RecoveryPlan.model_validate_json(raw)
        open_ids = {i.incident_id for i in open_incidents}
        return active if open_ids & set(active.incident_ids) else None

    async def _act(self, decision: Decision, event: FaultIncident, generation: int, log: Any) -> None:
        reg = self.registry
        if isinstance(decision, NoPlan):
            for iid in decision.inert:
                await reg.incident_transition(
                    iid, "planned", "done", generation, outcome="no_plan", reason="; ".join(decision.reasons)
                )
            self._decided(log, "no_plan", None, generation, decision.reasons)
            return
        if isinstance(decision, Escalation):
            await self._escalate(decision, log)
            self._decided(log, "escalation", None, generation, (decision.reason,), level="error")
            return
        stored = await reg.put_plan_once(decision.plan_id, encode(decision))
        if not stored and await reg.side_effect_done(decision.plan_id, "published"):
            self._decided(
                log,
                "plan_exists",
                decision.plan_id,
                generation,
                ("same incidents and generation: plan already published",),
            )
            return
        if not stored:
            # A retry after the publish failed (a broker restart): send the plan recorded under
            # this id, not this attempt's copy, which differs in its timestamps; the executor
            # refuses a copy that differs from the recorded one.
            recorded = await reg.get_plan(decision.plan_id)
            if recorded is not None:
                decision = RecoveryPlan.model_validate_json(recorded)
        await self.producer.publish(decision, wait=True)
        await reg.side_effect_once(decision.plan_id, "published")
        for iid in decision.incident_ids:
            await reg.incident_transition(iid, "planned", "planned", generation, plan_id=decision.plan_id)
        if decision.fallback == Fallback.WAIT:
            esc = Escalation(
                event_id=decision.plan_id.replace(PLAN_ID_PREFIX, "esc-"),
                job_id=decision.job_id,
                generation=generation,
                producer=SERVICE,
                incident_ids=decision.incident_ids,
                plan_id=decision.plan_id,
                reason="; ".join(decision.reasons),
            )
            await self.producer.publish(esc, wait=True)
            M.ESCALATIONS.labels(SERVICE).inc()
        self._decided(
            log,
            "plan",
            decision.plan_id,
            generation,
            decision.reasons,
            fallback=decision.fallback.value,
            restart=len(decision.restart_ranks),
            supersedes=decision.supersedes,
        )

    async def _escalate(self, esc: Escalation, log: Any) -> None:
        """Publish once (the event id is derived from the incidents) and mark every incident
        `escalated` with the reason: it stays open, and `flashrecovery status` lists it."""
        reg = self.registry
        if await reg.side_effect_once(esc.event_id, "escalated"):
            await self.producer.publish(esc, wait=True)
            M.ESCALATIONS.labels(SERVICE).inc()
        generation = await reg.generation()
        for iid in esc.incident_ids:
            phase = (await reg.incident(iid)).get("phase")
            if phase in ("done", "failed", "superseded", "escalated"):
                continue
            ok, why = await reg.incident_transition(
                iid, phase, "escalated", generation, reason=esc.reason, escalation_id=esc.event_id
            )
            if not ok:
                log.warning("incident_not_marked_escalated", escalated_incident=iid, reason=why)

    def _decided(
        self,
        log: Any,
        outcome: str,
        plan_id: str | None,
        generation: int,
        reasons: tuple[str, ...],
        level: str = "info",
        **extra: Any,
    ) -> None:
        entry = {
            "outcome": outcome,
            "plan_id": plan_id,
            "generation": generation,
            "reason": "; ".join(reasons),
            **extra,
        }
        self.decisions.append(entry)
        M.PLANNER_DECISIONS.labels(outcome).inc()
        del self.decisions[:-100]
        getattr(log, level)("planner_decision", **entry)


async def main(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and commit."""
    import signal

    M.serve(settings.metrics_port, settings.metrics_host)
    svc = PlannerService(settings)
    await svc.start(wait_assigned_s=None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(svc.stop()))
    try:
        await svc.run()
    finally:
        await svc.stop()
        await svc.close()
