"""The executor: drives recovery plans to completion through the sidecars.

Every phase transition is a compare-and-set in Redis and every phase start/end is timestamped
there and published, so a standby executor that takes the lease mid-recovery continues from the
persisted phase. Commands carry deterministic ids (plan, phase, attempt): a command re-sent
after a takeover is recognised by the sidecars, which replay their acks instead of acting twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import orjson

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import metrics as M
from flashrecovery.shared import topics as T
from flashrecovery.shared.commit_rule import InconsistentReports, decide_from_rows
from flashrecovery.shared.keys import EXECUTOR_LEASE
from flashrecovery.shared.logging import get_logger
from flashrecovery.shared.registry import FencedOut, Placement, RefusedWrite, Registry, StaleGeneration
from flashrecovery.shared.schemas import (
    Assignment,
    CommandAck,
    CommandAction,
    Escalation,
    ExecutorCommand,
    FaultIncident,
    PhaseStatus,
    RecoveryCompleted,
    RecoveryPlan,
    RecoveryProgress,
)
from flashrecovery.shared.settings import Settings
from flashrecovery.shared.topology import meta_ints

from .core import (
    PHASES,
    RECOVER_STAGES,
    TERMINAL,
    Waitlist,
    applied_topology,
    cannot_proceed,
    covered_by,
    fence_refusal,
    identity_refusal,
    in_band_outcome,
    judge,
    named_nodes,
    next_phase_name,
    plan_refusal,
    ranks_to_kill,
    resend_due,
    select_plan,
    settled,
    superseded_id,
    touched_nodes,
    waitlist,
)

PLACEMENT_POLL_S = 1.0  # how soon after a topology change the warm placement is rebuilt


class PhaseFailed(RuntimeError):
    pass


class PlanRefused(RuntimeError):
    """The plan must not run at all (stale): it ends with the given outcome, never fenced."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


class ExecutorService:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.instance = settings.instance
        self.log = get_logger("executor", job_id=settings.job_id, instance=self.instance)
        self.registry = Registry.from_url(settings.redis_url, settings.job_id)
        self.producer = busmod.Producer(settings.kafka_bootstrap, settings.bus, f"executor-{self.instance}")
        # Every instance follows plans and acks, so a standby that takes over already knows them.
        self.plan_consumer = busmod.Consumer(
            settings.kafka_bootstrap,
            settings.bus,
            [T.PLANS],
            None,
            self.on_plan,
            self.producer,
            f"executor-{self.instance}-plans",
        )
        self.ack_consumer = busmod.Consumer(
            settings.kafka_bootstrap,
            settings.bus,
            [T.ACKS],
            None,
            self.on_ack,
            self.producer,
            f"executor-{self.instance}-acks",
            from_latest=True,
        )
        self.plans: dict[str, RecoveryPlan] = {}
        self.acks: dict[str, dict[str, dict[str, CommandAck]]] = {}  # command -> stage -> node -> ack
        self.waitlists: dict[str, Waitlist] = {}  # plan -> its waitlist, read once at pause
        self.ack_times: dict[tuple[str, str], list[float]] = {}  # (command, stage) -> first, last seen
        self.placement: Placement | None = None  # every rank's node, kept warm between plans
        self.ack_event = asyncio.Event()
        self.plan_event = asyncio.Event()
        self.stopping = asyncio.Event()
        self.driving: tuple[str, asyncio.Task] | None = None
        self.leader = False
        self.token: int | None = None  # the lease's fence token while this instance holds it
        self.lease_until = 0.0  # monotonic: past it, the lease may be someone else's
        self.commands_sent = 0
        self.commands_resent = 0  # sent again while their phase waited (core.resend_due)
        self.sent: dict[str, ExecutorCommand] = {}  # command id -> the command, to send it again
        self.sound: set[str] = set()  # plan ids checked against the registry (core.plan_refusal)
        self.refused = 0  # invalid plans refused (logged: plan_refused_invalid)
        self.refused_ids: set[str] = set()

    # ------------------------------------------------------------------ inputs
    async def on_plan(self, plan: Any, record: Any) -> None:
        if not isinstance(plan, RecoveryPlan) or plan.job_id != self.s.job_id:
            return
        if plan.plan_id in self.sound and self.plans.get(plan.plan_id) != plan:
            # The copy checked against the registry stays; another under its id is not it.
            self.log.warning("plan_copy_ignored", plan_id=plan.plan_id[:100], producer=plan.producer[:100])
            return
        self.plans[plan.plan_id] = plan
        self.plan_event.set()

    async def on_ack(self, ack: Any, record: Any) -> None:
        if not isinstance(ack, CommandAck) or ack.job_id != self.s.job_id:
            return
        # Redelivered acks overwrite themselves: idempotent by (command, node, stage).
        self.acks.setdefault(ack.command_id, {}).setdefault(ack.stage, {})[ack.node_id] = ack
        seen = self.ack_times.setdefault((ack.command_id, ack.stage), [time.time(), 0.0])
        seen[1] = time.time()
        self.ack_event.set()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        await self.producer.start()
        for c in (self.plan_consumer, self.ack_consumer):
            await c.start()
        tasks = [
            asyncio.create_task(self.plan_consumer.run()),
            asyncio.create_task(self.ack_consumer.run()),
            asyncio.create_task(self._keep_placement_warm()),
        ]
        await self.ack_consumer.wait_assigned()
        self.log.info("ready")
        try:
            while not self.stopping.is_set():
                await self._lead_once()
                self.plan_event.clear()
                try:
                    await asyncio.wait_for(self.plan_event.wait(), self.s.executor.lease_ttl_s / 3)
                except TimeoutError:
                    pass
        finally:
            if self.driving:
                self.driving[1].cancel()
                await asyncio.gather(self.driving[1], return_exceptions=True)
            self.plan_consumer.stop()
            self.ack_consumer.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.producer.stop()
            await self.registry.close()

    async def _keep_placement_warm(self) -> None:
        """Parsing 100k rank records takes ~1 s on a loaded 2-core box: do it when the topology
        changes, not at the start of the next plan's pause."""
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):
                self.placement = await self.registry.versioned_rank_nodes(self.placement)
            await asyncio.sleep(PLACEMENT_POLL_S)

    async def _lead_once(self) -> None:
        await self.registry.heartbeat_liveness("executor", self.instance)
        ttl = self.s.executor.lease_ttl_s
        asked = time.monotonic()
        try:
            token = await self.registry.acquire_lease(EXECUTOR_LEASE, self.instance, ttl)
        except Exception:  # noqa: BLE001 - Redis unreachable: the lease cannot be trusted either
            token = None
        if token != self.token:
            # Lost, or lost and taken again: whatever was being driven under the old token stops
            # now, without another write (they would be refused anyway).
            await self._stop_driving("lease lost" if token is None else "new lease token")
            # Lost: keep writing with the old token, so any write still under way is refused.
            self.registry.fence = (EXECUTOR_LEASE, token if token is not None else self.token or 0)
            self.token = token
            self.log.info("leadership", leader=token is not None, fence_token=token)
        self.leader = token is not None
        M.EXECUTOR_LEADER.labels(self.instance).set(1 if self.leader else 0)
        if not self.leader:
            return
        self.lease_until = asked + ttl
        if self.driving and self.driving[1].done():
            self.driving = None
        try:
            plan = await self._next_plan()
        except FencedOut as exc:
            self.log.warning("fenced_out", reason=str(exc))
            await self._stop_driving("fenced out")
            return
        if plan is None:
            return
        if self.driving and self.driving[0] == plan.plan_id:
            return
        # A plan still driven here was neither chosen nor retired: it has just ended and is
        # publishing its completion. Let it finish that (bounded) rather than cut it short.
        await self._stop_driving(f"{plan.plan_id} is next", grace_s=10.0)
        self.driving = (plan.plan_id, asyncio.create_task(self._drive(plan)))

    async def _stop_driving(self, why: str, grace_s: float = 0.0) -> None:
        if self.driving is None:
            return
        plan_id, task = self.driving
        self.driving = None
        if grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), grace_s)
        if not task.done():
            self.log.info("drive_stopped", plan_id=plan_id, reason=why)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _next_plan(self) -> RecoveryPlan | None:
        """The newest plan that may still run (core.select_plan). Every plan that never may is
        ended here (superseded, or failed when no newer plan covers its incidents), so it is
        never driven later, e.g. after the newer one finished."""
        plans = list(self.plans.values())
        runs = await self.registry.run_states([p.plan_id for p in plans])
        plans = [p for p in plans if await self._sound(p, started=bool(runs[p.plan_id]))]
        choice = select_plan(plans, runs, await self.registry.generation())
        for plan, outcome, reason in choice.retire:
            if self.driving and self.driving[0] == plan.plan_id:
                await self._stop_driving(reason)
            self.log.info(
                "plan_retired", plan_id=plan.plan_id, outcome=outcome, reason=reason, started=bool(runs[plan.plan_id])
            )
            await self._end_unrun(plan, outcome, reason)
        return choice.drive

    async def _sound(self, plan: RecoveryPlan, started: bool) -> bool:
        """A plan is checked against the registry once, before anything else sees it
        (core.plan_refusal; one already started, e.g. met by a standby taking over, only for
        being the planner's). An invalid one is refused loudly: never started, its run ends
        failed with the reason (an escalation), it is forgotten, and the job is never touched;
        nor can it retire, supersede or cover a sound plan. A forged copy under a real plan's
        id is dropped for the registry's copy."""
        if plan.plan_id in self.sound:
            return True
        why = await self._plan_refusal(plan, identity_only=started)
        if why is None:
            self.sound.add(plan.plan_id)
            return True
        self.refused += 1
        self.log.error(
            "plan_refused_invalid",
            plan_id=plan.plan_id[:100],
            reason=why,
            incident_ids=list(plan.incident_ids[:10]),
            producer=plan.producer[:100],
            started=started,
            refused=self.refused,
        )
        self.plans.pop(plan.plan_id, None)
        stored = await self.registry.get_plan(plan.plan_id)
        real = None
        with contextlib.suppress(ValueError):
            real = RecoveryPlan.model_validate_json(stored) if stored is not None else None
        if real is not None and real != plan:
            self.plans[plan.plan_id] = real  # a forged copy under a real id: the real one is checked next
            self.plan_event.set()
            return False
        if not started and plan.plan_id not in self.refused_ids and len(self.refused_ids) < 10_000:
            self.refused_ids.add(plan.plan_id)
            await self._end_unrun(plan, "failed", f"invalid plan refused: {why}")
        return False

    async def _plan_refusal(self, plan: RecoveryPlan, identity_only: bool = False) -> str | None:
        """core.plan_refusal with the registry's view, read for the plan's own ranks and nodes
        (the placement is the warm copy)."""
        stored_raw = await self.registry.get_plan(plan.plan_id)
        try:
            stored = RecoveryPlan.model_validate_json(stored_raw) if stored_raw is not None else None
        except ValueError:
            stored = None
        if identity_only:
            return identity_refusal(plan, stored)
        meta = await self.registry.meta()
        if not meta:
            return f"job {self.s.job_id} has no topology in the registry"
        m = meta_ints(meta)
        self.placement = await self.registry.versioned_rank_nodes(self.placement)
        names = sorted(named_nodes(plan))[:10_000]
        nodes = {n.node_id: n for n in await self.registry.get_nodes(names)}
        return plan_refusal(
            plan,
            generation=int(m.get("generation", -1)),
            world_size=int(m.get("world_size", 0)),
            rank_nodes=self.placement[1],
            nodes_by_id=nodes,
            stored=stored,
        )

    async def _end_unrun(self, plan: RecoveryPlan, outcome: str, reason: str) -> None:
        """A plan that will not run (any more): its run ends in `outcome` (terminal)."""
        ok, why = await self.registry.run_transition(
            plan.plan_id, (await self._run_state(plan.plan_id)).get("phase"), outcome, await self.registry.generation()
        )
        if ok:
            await self._finish(plan, outcome, await self._run_state(plan.plan_id), reason=reason)
        else:
            self.log.warning("transition_refused", plan_id=plan.plan_id, new=outcome, why=why)

    # ------------------------------------------------------------------ one plan
    async def _run_state(self, plan_id: str) -> dict[str, str]:
        return await self.registry.run_state(plan_id)

    async def _set_run(self, plan_id: str, **fields: Any) -> None:
        await self.registry.put_run(plan_id, fields)  # fenced by the lease token

    async def _transition(
        self, plan: RecoveryPlan, expected: str | None, new: str, generation: int | None = None
    ) -> bool:
        """CAS on the run's phase (Lua), fenced by the lease token: two executors can never both
        move the same plan. A live phase moves only while the registry is still at the plan's
        own generation (the one its fence set; before the fence, the one it was made against):
        once a newer plan fenced, this one cannot take another step. Ending a plan (terminal)
        is always allowed."""
        if generation is not None:
            gen = generation  # the start of a plan: the generation fence_refusal just accepted
        elif new in TERMINAL:
            gen = await self.registry.generation()
        else:
            state = await self._run_state(plan.plan_id)
            gen = int(state["generation"]) if "generation" in state else plan.target_generation - 1
        ok, why = await self.registry.run_transition(plan.plan_id, expected, new, gen)
        if not ok:
            self.log.warning("transition_refused", plan_id=plan.plan_id, expected=expected, new=new, why=why)
        return ok

    async def _drive(self, plan: RecoveryPlan) -> None:
        log = self.log.bind(plan_id=plan.plan_id, incident_id=",".join(plan.incident_ids))
        try:
            await self._drive_phases(plan, log)
        except FencedOut as exc:
            # Deposed: another executor holds the lease and continues this plan from Redis.
            log.warning("fenced_out", reason=str(exc))
            self.plan_event.set()  # the lead loop notices at once
        except PlanRefused as exc:
            log.warning("plan_refused", outcome=exc.outcome, reason=str(exc))
            with contextlib.suppress(FencedOut):
                await self._end_unrun(plan, exc.outcome, str(exc))

    async def _drive_phases(self, plan: RecoveryPlan, log) -> None:
        state = await self._run_state(plan.plan_id)
        if not state:
            base = await self._refuse_if_stale(plan)
            if not await self._transition(plan, None, "fence", generation=base):
                return
            await self.registry.set_active_plan(plan.plan_id)
            await self._set_run(plan.plan_id, received_at=time.time())
            for inc in plan.incident_ids:
                await self._mark_incident(inc, "recovering")
            state = await self._run_state(plan.plan_id)
        else:
            log.info("resuming_plan", phase=state.get("phase"))
        phase = state["phase"]
        try:
            while phase not in TERMINAL:
                await self._phase_mark(plan, phase, "start")
                await getattr(self, f"_phase_{phase}")(plan, log)
                await self._phase_mark(plan, phase, "end")
                nxt = next_phase_name(phase)
                if not await self._transition(plan, phase, nxt):
                    return
                phase = nxt
            if phase == "done":
                await self._finish(plan, "done", await self._run_state(plan.plan_id))
        except PhaseFailed as exc:
            newer = await self._superseding_plan(plan)
            if newer is not None:
                log.warning("plan_failed_superseded", phase=phase, reason=str(exc), by=newer.plan_id)
                await self._transition(plan, phase, "superseded")
                await self._finish(
                    plan,
                    "superseded",
                    await self._run_state(plan.plan_id),
                    reason=f"{exc}; superseded by {newer.plan_id}",
                )
                self.plan_event.set()
                return
            log.error("plan_failed", phase=phase, reason=str(exc))
            await self._transition(plan, phase, "failed")
            await self._finish(plan, "failed", await self._run_state(plan.plan_id), reason=str(exc))

    async def _superseding_plan(self, plan: RecoveryPlan) -> RecoveryPlan | None:
        """A newer plan carrying this one's incidents, waited for up to supersede_grace_s: a
        failure caused by a second fault is the planner's to re-plan, not an escalation."""
        deadline = time.monotonic() + self.s.executor.supersede_grace_s
        while True:
            newer = covered_by(plan, self.plans.values())
            started = newer is not None and bool(await self._run_state(newer.plan_id))
            if newer is not None and not await self._sound(newer, started=started):
                continue  # refused: forgotten, or swapped for the registry's copy (each once): look again
            if newer is not None or time.monotonic() >= deadline:
                return newer
            self.plan_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.plan_event.wait(), max(0.01, deadline - time.monotonic()))

    async def _phase_mark(self, plan: RecoveryPlan, phase: str, edge: str) -> None:
        key = f"t:{phase}:{edge}"
        state = await self._run_state(plan.plan_id)
        at = float(state[key]) if key in state else time.time()
        if key not in state:
            await self._set_run(plan.plan_id, **{key: at})
        gen = int(state.get("generation", plan.target_generation))
        await self.producer.publish(
            RecoveryProgress(
                job_id=self.s.job_id,
                generation=gen,
                producer=f"executor-{self.instance}",
                incident_id=",".join(plan.incident_ids),
                plan_id=plan.plan_id,
                phase=phase,
                status=PhaseStatus.STARTED if edge == "start" else PhaseStatus.COMPLETED,
                at=at,
            )
        )

    async def _command(self, plan: RecoveryPlan, action: CommandAction, attempt: int, **fields: Any) -> str:
        state = await self._run_state(plan.plan_id)
        cmd = ExecutorCommand(
            job_id=self.s.job_id,
            generation=int(state["generation"]),
            producer=f"executor-{self.instance}",
            command_id=f"{plan.plan_id}:{action}:{attempt}",
            plan_id=plan.plan_id,
            incident_id=",".join(plan.incident_ids),
            action=action,
            attempt=attempt,
            fence_token=self.token,
            **fields,
        )
        await self._publish_fenced(cmd)
        self.commands_sent += 1
        self.sent[cmd.command_id] = cmd
        return cmd.command_id

    async def _publish_fenced(self, cmd: ExecutorCommand) -> None:
        # A command is the one act outside Redis: sent only while the lease is surely ours (a
        # process stopped past its lease sees the monotonic clock moved) and still the newest
        # token in Redis. The sidecars check the token too, for what slips between the two.
        if time.monotonic() > self.lease_until:
            raise FencedOut("lease may have expired: not renewed in time")
        await self.registry.check_fence()
        await self.producer.publish(cmd, wait=True)

    async def _resend(self, command_id: str, missing: int) -> None:
        """The same command again (same id), under the same guards as its first sending."""
        cmd = self.sent.get(command_id)
        if cmd is None:  # an earlier leader sent it: pause/replace go again at their retry,
            # a recover at the takeover (_recover_stage)
            return
        await self._publish_fenced(cmd)
        self.commands_resent += 1
        self.log.info("command_resent", command_id=command_id, action=str(cmd.action), missing=missing)

    async def _await_acks(
        self,
        command_id: str,
        stage: str,
        expected: frozenset[str],
        attempt: int,
        retries: int,
        timeout_s: float | None = None,
        fail_from: frozenset[str] | None = None,
        plan: RecoveryPlan | None = None,
    ) -> tuple[str, dict[str, CommandAck]]:
        started = last_sent = time.monotonic()
        timeout_s = timeout_s or self.s.executor.phase_timeout_s
        while True:
            if time.monotonic() > self.lease_until:
                # Stopped past the lease (SIGSTOP, a long pause): the acks now arriving may answer
                # the new leader's re-send of the same command id; they are not ours to act on.
                raise FencedOut("lease may have expired while waiting for acks")
            newer = covered_by(plan, self.plans.values()) if plan is not None else None
            if newer is not None:
                # A second fault during the stages (e.g. a survivor that never answered its
                # pause, which no node waits for with the in-band decision): the stage could
                # only time out; the newer plan re-pauses everyone. Only a sound plan may cover
                # this one (a forged one is refused and forgotten here: look again).
                if await self._sound(newer, started=bool(await self._run_state(newer.plan_id))):
                    return "fail", {"_reason": f"superseded by {newer.plan_id} while waiting"}
                continue
            got = self.acks.get(command_id, {}).get(stage, {})
            verdict = judge(got, expected, started, time.monotonic(), timeout_s, attempt, retries, fail_from)
            if verdict.outcome != "wait":
                return verdict.outcome if verdict.outcome != "advance" else "ok", {**got, "_reason": verdict.reason}
            if resend_due(verdict, last_sent, time.monotonic(), self.s.executor.command_resend_s):
                last_sent = time.monotonic()
                await self._resend(command_id, len(expected - got.keys()))
            self.ack_event.clear()
            try:
                await asyncio.wait_for(self.ack_event.wait(), 0.2)
            except TimeoutError:
                pass

    async def _with_retries(
        self, plan: RecoveryPlan, action: CommandAction, stage: str, expected: frozenset[str], log, **fields: Any
    ) -> dict[str, CommandAck]:
        retries = self.s.executor.phase_retries
        for attempt in range(retries + 1):
            command_id = await self._command(plan, action, attempt, **fields)
            outcome, acks = await self._await_acks(command_id, stage, expected, attempt, retries)
            reason = acks.pop("_reason")
            first, last = self.ack_times.pop((command_id, stage), (None, None))
            log.info(
                "phase_acks",
                action=str(action),
                stage=stage,
                outcome=outcome,
                reason=reason,
                attempt=attempt,
                acks=len(acks),
                first_ack_at=first,
                last_ack_at=last,
            )
            if outcome == "ok":
                return acks
            if outcome == "fail":
                raise PhaseFailed(f"{action}/{stage}: {reason}")
        raise PhaseFailed(f"{action}/{stage}: retries exhausted")

    # ------------------------------------------------------------------ phases
    async def _refuse_if_stale(self, plan: RecoveryPlan) -> int:
        """-> the registry generation this plan may fence from; raises PlanRefused when the
        plan was made against a generation the registry has left (core.fence_refusal)."""
        cur = await self.registry.generation()
        old = superseded_id(plan, self.plans.values())
        superseded_run = await self._run_state(old) if old else None
        why = fence_refusal(plan, cur, superseded_run or None)
        if why is not None:
            cover = covered_by(plan, self.plans.values())
            raise PlanRefused("superseded" if cover is not None and cur > plan.target_generation - 1 else "failed", why)
        return cur

    async def _phase_fence(self, plan: RecoveryPlan, log) -> None:
        state = await self._run_state(plan.plan_id)
        if "generation" in state:
            return
        cur = await self._refuse_if_stale(plan)
        try:
            gen = await self.registry.bump_generation(cur)  # CAS: nobody fenced in between
        except StaleGeneration as exc:
            raise PlanRefused("failed", f"fence: {exc}") from None
        await self._set_run(plan.plan_id, generation=gen, snapshot_generation=cur)
        log.info("fenced", generation=gen)

    async def _waitlist(self, plan: RecoveryPlan) -> Waitlist:
        """Read once per plan: nothing but this plan's own replace writes the topology between
        its pause and its replace. A standby that takes over reads it afresh."""
        if plan.plan_id not in self.waitlists:
            self.placement = await self.registry.versioned_rank_nodes(self.placement)
            self.waitlists[plan.plan_id] = waitlist(plan, self.placement[1])
        return self.waitlists[plan.plan_id]

    async def _phase_pause(self, plan: RecoveryPlan, log) -> None:
        wl = await self._waitlist(plan)
        if self.s.executor.in_band_commit:
            # O(changed nodes): the survivors decide in the rebuild (core.Waitlist.pause_reporters).
            acks = await self._with_retries(
                plan,
                CommandAction.PAUSE,
                "done",
                wl.pause_reporters & wl.pause,
                log,
                kill_ranks=ranks_to_kill(plan),
                stage_nodes=tuple(sorted(wl.pause_reporters)),
            )
            await self._set_run(plan.plan_id, in_band=1)
            return
        acks = await self._with_retries(
            plan, CommandAction.PAUSE, "done", wl.pause, log, kill_ranks=ranks_to_kill(plan)
        )
        restart = set(plan.restart_ranks)
        all_rows = [row for a in acks.values() for row in a.vote_rows()]
        rows = [row for row in all_rows if row[0] not in restart]
        try:
            decision = decide_from_rows(rows)
        except InconsistentReports as exc:
            raise PhaseFailed(f"commit rule: {exc}") from None
        max_applied = max((applied for _, applied, _, _ in rows), default=0)
        computed = max([grads or 0 for _, _, grads, _ in rows] + [max_applied])
        # Lost committed steps are judged against sources the commit rule did not decide from:
        # the replaced ranks' last step reports (their sidecars add them to the pause ack) and
        # the last step the registry recorded as committed by every rank.
        before = max([applied for _, applied, _, _ in all_rows] + [await self.registry.committed_step()])
        await self._set_run(
            plan.plan_id,
            commit_step=-1 if decision.commit_step is None else decision.commit_step,
            resume_step=decision.resume_step,
            commit_reason=decision.reason,
            applied_before=before,
            steps_lost=max(0, before - (decision.resume_step - 1)),
            steps_recomputed=max(0, computed - (decision.resume_step - 1)),
        )
        log.info(
            "commit_decision",
            commit_step=decision.commit_step,
            resume_step=decision.resume_step,
            reason=decision.reason,
        )

    async def _phase_replace(self, plan: RecoveryPlan, log) -> None:
        why = cannot_proceed(plan)
        if why is not None:
            raise PhaseFailed(why)
        wl = await self._waitlist(plan)
        state = await self._run_state(plan.plan_id)
        gen = int(state["generation"])
        assignments = tuple(
            Assignment(rank=r.rank, local_rank=r.local_rank, node_id=r.to_node) for r in plan.replacements
        )
        await self._with_retries(
            plan,
            CommandAction.REPLACE,
            "done",
            wl.replace,
            log,
            nodes=tuple(sorted(wl.replace | set(plan.faulty_nodes))),
            kill_ranks=ranks_to_kill(plan),
            assignments=assignments,
        )
        if "topology_written" not in state:
            moved = {r.rank: r for r in await self.registry.get_ranks(rep.rank for rep in plan.replacements)}
            nodes_by_id = {n.node_id: n for n in await self.registry.get_nodes(sorted(touched_nodes(plan)))}
            ranks, nodes = applied_topology(plan, moved, nodes_by_id, gen)
            try:
                await self.registry.put_ranks(gen, ranks)
                await self.registry.put_nodes(gen, nodes)
            except RefusedWrite as exc:
                raise PhaseFailed(f"replace: topology write refused: {exc}") from None
            await self._set_run(
                plan.plan_id, topology_written=1, recover_nodes=sorted(wl.recover), stage_nodes=sorted(wl.stages)
            )

    async def _recover_stage(self, plan: RecoveryPlan, phase: str, log) -> None:
        state = await self._run_state(plan.plan_id)
        recover = frozenset(orjson.loads(state["recover_nodes"]))
        # A run state written before stage_nodes existed: every node reports every stage.
        stage_nodes = frozenset(orjson.loads(state["stage_nodes"])) if "stage_nodes" in state else recover
        expected = stage_nodes  # the others report only failures (core.Waitlist.stages)
        in_band = "in_band" in state
        if state.get("recover_command") not in self.sent:
            # The first sending, or a plan taken over from a leader that died after sending it:
            # the same command (same id) again. Sidecars that acted on it replay the acks they
            # sent (CommandGate), which this leader may have missed: it subscribed after they
            # went out, and a recover stage is never retried, so nothing else would send them
            # again (seen: a leader killed 0.1 s into a recovery waited 60 s for acks sent
            # 0.3 s before it started, and the plan failed after the job had finished).
            if in_band:
                steps: dict[str, Any] = {"in_band": True}
            else:
                commit = int(state["commit_step"])
                steps = {"commit_step": None if commit < 0 else commit, "resume_step": int(state["resume_step"])}
            command_id = await self._command(
                plan,
                CommandAction.RECOVER,
                0,
                world_size=plan.world_size,
                transfers=plan.transfers,
                stage_nodes=tuple(sorted(stage_nodes)),
                **steps,
            )
            await self._set_run(plan.plan_id, recover_command=command_id)
        else:
            command_id = state["recover_command"]
        # Stages of one broadcast: a stage that fails is not retried on its own; the incident
        # fails and escalates (a superseding plan re-pauses everyone and starts over).
        outcome, acks = await self._await_acks(
            command_id, RECOVER_STAGES[phase], expected, 0, 0, fail_from=recover, plan=plan
        )
        reason = acks.pop("_reason")
        first, last = self.ack_times.pop((command_id, RECOVER_STAGES[phase]), (None, None))
        if outcome != "ok":
            raise PhaseFailed(f"{phase}: {reason}")
        if phase == "rebuild" and in_band and "resume_step" not in state:
            await self._record_in_band(plan, acks, log)
        if phase == "restore":
            moved = sum(r.bytes or 0 for a in acks.values() for r in a.report_rows())
            await self._set_run(plan.plan_id, restore_bytes=moved)
        log.info("stage_done", phase=phase, nodes=len(acks), first_ack_at=first, last_ack_at=last)

    async def _record_in_band(self, plan: RecoveryPlan, acks: dict[str, CommandAck], log) -> None:
        """The survivors' decision, read off the stage nodes' `rebuilt` reports, into the run
        state, with the lost-steps judgement the pause phase makes on the other path."""
        got = in_band_outcome(
            (r.commit_step, r.resume_step, r.computed_step) for a in acks.values() for r in a.report_rows()
        )
        if isinstance(got, str):
            raise PhaseFailed(f"rebuild: {got}")
        # Lost committed steps, against what the rule did not decide from: the replaced ranks'
        # last step reports (their nodes' pause acks, every attempt) and the registry's record.
        replaced = [
            r.applied_step
            for cid, by_stage in self.acks.items()
            if cid.startswith(f"{plan.plan_id}:{CommandAction.PAUSE}:")
            for a in by_stage.get("done", {}).values()
            for r in a.report_rows()
        ]
        before = max([*replaced, await self.registry.committed_step()])
        await self._set_run(
            plan.plan_id,
            commit_step=-1 if got.commit_step is None else got.commit_step,
            resume_step=got.resume_step,
            commit_reason=(
                f"in-band: the survivors decided to resume at {got.resume_step}"
                + (f", lagging ones applying step {got.commit_step} first" if got.commit_step is not None else "")
            ),
            applied_before=before,
            steps_lost=max(0, before - (got.resume_step - 1)),
            steps_recomputed=max(0, got.computed_step - (got.resume_step - 1)),
        )
        log.info("commit_decision", commit_step=got.commit_step, resume_step=got.resume_step, in_band=True)

    async def _phase_rebuild(self, plan, log) -> None:
        await self._recover_stage(plan, "rebuild", log)

    async def _phase_restore(self, plan, log) -> None:
        await self._recover_stage(plan, "restore", log)

    async def _phase_resume(self, plan, log) -> None:
        await self._recover_stage(plan, "resume", log)

    async def _phase_verify(self, plan, log) -> None:
        await self._recover_stage(plan, "verify", log)

    # ------------------------------------------------------------------ the end of a plan
    async def _mark_incident(self, incident_id: str, phase: str) -> None:
        cur = (await self.registry.incident(incident_id)).get("phase")
        if cur != phase and cur not in TERMINAL:
            gen = await self.registry.generation()
            await self.registry.incident_transition(incident_id, cur, phase, gen)

    async def _finish(self, plan: RecoveryPlan, outcome: str, state: dict[str, str], reason: str = "") -> None:
        if outcome == "superseded":
            await self._transition(plan, (await self._run_state(plan.plan_id)).get("phase"), "superseded")
        self.waitlists.pop(plan.plan_id, None)
        self.sent = {cid: c for cid, c in self.sent.items() if c.plan_id != plan.plan_id}
        if not await self.registry.side_effect_once(plan.plan_id, f"completed:{outcome}"):
            return
        phase_seconds = {
            p: round(float(state[f"t:{p}:end"]) - float(state[f"t:{p}:start"]), 4)
            for p in PHASES
            if f"t:{p}:end" in state and f"t:{p}:start" in state
        }
        first_seen = detected = fault_class = None
        for inc_id in plan.incident_ids:
            raw = (await self.registry.incident(inc_id)).get("incident")
            if raw:
                inc = FaultIncident.model_validate_json(raw)
                first_seen = min(first_seen or inc.first_seen_at, inc.first_seen_at)
                detected = min(detected or inc.detected_at, inc.detected_at)
                fault_class = fault_class or inc.fault_class
        end = float(state.get("t:verify:end", time.time()))
        gen = int(state.get("generation", plan.target_generation))
        if outcome == "done":
            resume = int(state["resume_step"])
            try:
                # every rank has applied resume - 1; resume itself is merely the next step
                await self.registry.record_committed_step(gen, resume - 1)
                await self.registry.put_ranks(gen, settled(await self.registry.get_ranks(plan.restart_ranks)))
            except StaleGeneration:
                pass
            for inc in plan.incident_ids:
                await self._mark_incident(inc, "done")
            await self.registry.clear_active_plan(plan.plan_id)
        elif outcome == "failed":
            await self.producer.publish(
                Escalation(
                    job_id=self.s.job_id,
                    generation=gen,
                    producer=f"executor-{self.instance}",
                    incident_ids=plan.incident_ids,
                    plan_id=plan.plan_id,
                    reason=reason,
                ),
                wait=True,
            )
            M.ESCALATIONS.labels("executor").inc()
        done = RecoveryCompleted(
            job_id=self.s.job_id,
            generation=gen,
            producer=f"executor-{self.instance}",
            incident_id=",".join(plan.incident_ids),
            plan_id=plan.plan_id,
            outcome=outcome,
            fault_class=fault_class,
            phase_seconds=phase_seconds,
            detection_latency_s=round(detected - first_seen, 4) if detected and first_seen else None,
            rto_s=round(end - first_seen, 4) if first_seen and outcome == "done" else None,
            recovery_step=int(state["resume_step"]) if "resume_step" in state else None,
            steps_recomputed=int(state.get("steps_recomputed", 0)),
            committed_steps_lost=int(state.get("steps_lost", 0)),
            reason=reason or state.get("commit_reason", ""),
        )
        await self.producer.publish(done, wait=True)
        M.RECOVERIES.labels(outcome, M.label(fault_class)).inc()
        for phase, seconds in phase_seconds.items():
            M.PHASE_SECONDS.labels(phase).observe(max(0.0, seconds))
        if done.rto_s is not None:
            M.RTO.labels(M.label(fault_class)).observe(done.rto_s)
        if outcome == "done" and done.recovery_step is not None:
            M.RESUME_STEP.set(done.recovery_step)
        self.log.info(
            "plan_finished",
            plan_id=plan.plan_id,
            outcome=outcome,
            rto_s=done.rto_s,
            phases=phase_seconds,
            resume_step=done.recovery_step,
            committed_steps_lost=done.committed_steps_lost,
            steps_recomputed=done.steps_recomputed,
            reason=done.reason,
        )


async def main(settings: Settings) -> None:
    M.serve(settings.metrics_port, settings.metrics_host)
    svc = ExecutorService(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, svc.stopping.set)
    await svc.run()
