"""The planner against a real broker and a real Redis: incident in, plan out and persisted; a
replayed incident gives the same plan id and no second plan."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from flashrecovery.planner.app import PlannerService
from flashrecovery.shared import topics
from flashrecovery.shared.bus import Consumer
from flashrecovery.shared.schemas import Degradation, FaultClass, FaultIncident, RecoveryPlan, RepairAction
from flashrecovery.shared.topology import grid_topology

pytestmark = pytest.mark.timeout(90)


def incident(job_id: str, incident_id: str, node: str) -> FaultIncident:
    return FaultIncident(
        job_id=job_id,
        generation=0,
        producer="test",
        incident_id=incident_id,
        fault_class=FaultClass.NODE_LOST,
        action=RepairAction.REPLACE_NODE,
        root_cause_nodes=(node,),
        first_seen_at=100.0,
        detected_at=101.0,
        reason="heartbeats missed",
    )


async def wait_for(cond, timeout_s: float, what: str) -> None:
    async def _poll() -> None:
        while not cond():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(_poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


async def test_incident_in_plan_out_and_replay_is_idempotent(topics_ready, producer, registry):
    settings = topics_ready
    plans, watcher, svc, tasks = await _planner_for_grid(settings, producer, registry)
    try:
        # A degradation on the same topic is ignored; the incident is planned.
        await producer.publish(
            Degradation(
                job_id=settings.job_id,
                generation=0,
                producer="test",
                node_id="node-3",
                rank=6,
                step_time_s=2.0,
                median_step_time_s=1.0,
                consecutive=5,
            ),
            wait=True,
        )
        first = incident(settings.job_id, "inc-1", "node-1")
        await producer.publish(first, wait=True)
        await wait_for(lambda: len(plans) >= 1, 30, "the recovery plan")
        p = plans[0]
        assert p.incident_ids == ("inc-1",)
        assert p.faulty_nodes == ("node-1",)
        assert p.restart_ranks == (2, 3)
        assert {r.to_node for r in p.replacements} == {"spare-0"}
        assert {t.dst for t in p.transfers} == {2, 3}
        assert p.target_generation == 1 and p.recovery_step == 0
        stored = await registry.get_plan(p.plan_id)
        assert stored is not None and RecoveryPlan.model_validate_json(stored).plan_id == p.plan_id
        inc_state = await registry.incident("inc-1")
        assert inc_state["phase"] == "planned" and inc_state["plan_id"] == p.plan_id

        # Replay: same incident, new event id (a re-emitting detector), and the exact same event.
        replay = first.model_copy(update={"event_id": "replayed-event"})
        await producer.publish(replay, wait=True)
        await producer.publish(first, wait=True)
        await wait_for(lambda: svc.consumer.handled >= 4, 30, "the replays to be handled")
        await asyncio.sleep(0.5)  # a second plan, if one were published, would have landed
        assert len(plans) == 1
        outcomes = [d["outcome"] for d in svc.decisions]
        assert outcomes == ["plan", "incident_known"], svc.decisions
        assert svc.decisions[-1]["plan_id"] == p.plan_id
    finally:
        await _stop(watcher, svc, tasks)


async def test_a_recovered_incident_in_a_new_envelope_starts_no_second_recovery(topics_ready, producer, registry):
    """Idempotency by the incident's identity: once its recovery is done (generation moved on),
    the same incident id under a new event id, even with other content, is not planned again (it
    was: a second plan against the new generation re-killed the recovered rank). An incident
    whose plan never got out (a planner stopped half-way) is still planned, from the registry's
    copy."""
    settings = topics_ready
    plans, watcher, svc, tasks = await _planner_for_grid(settings, producer, registry)
    try:
        first = incident(settings.job_id, "inc-1", "node-1")
        await producer.publish(first, wait=True)
        await wait_for(lambda: len(plans) >= 1, 30, "the recovery plan")
        # What the executor does: fence (generation 0 -> 1), recover, mark the incident done.
        assert await registry.bump_generation(0) == 1
        assert (await registry.incident_transition("inc-1", "planned", "done", 1))[0]
        forged = first.model_copy(update={"event_id": "forged-1", "generation": 1, "root_cause_nodes": ("node-2",)})
        await producer.publish(forged, wait=True)
        # Half-way: recorded as planned, no plan out (no plan_id): planned now.
        half = incident(settings.job_id, "inc-2", "node-3")
        assert (await registry.incident_transition("inc-2", None, "planned", 1, incident=half.model_dump_json()))[0]
        await producer.publish(
            half.model_copy(update={"event_id": "redelivered", "root_cause_nodes": ("node-0",)}), wait=True
        )
        await wait_for(lambda: len(plans) >= 2, 30, "the half-way incident's plan")
        await asyncio.sleep(0.3)
        assert [p.incident_ids for p in plans] == [("inc-1",), ("inc-2",)]
        assert plans[1].faulty_nodes == ("node-3",)  # the registry's copy, not the envelope's
        known = [d for d in svc.decisions if d["outcome"] == "incident_known"]
        assert len(known) == 1 and "ended (done)" in known[0]["reason"]
    finally:
        await _stop(watcher, svc, tasks)


async def _planner_for_grid(settings, producer, registry):
    """The usual 4 x 2 (tp 2) job with a spare registered, a planner running, and the plans it
    publishes collected: (plans, watcher, svc, tasks), the watcher assigned."""
    await registry.init_job(grid_topology(settings.job_id, nodes=4, ranks_per_node=2, tp=2, spares=1))
    plans: list[RecoveryPlan] = []

    async def on_plan(event, _record) -> None:
        if isinstance(event, RecoveryPlan):
            plans.append(event)

    watcher, svc, tasks = await _start(settings, producer, [topics.PLANS], on_plan, "test-plans")
    await watcher.wait_assigned(30)
    return plans, watcher, svc, tasks


async def _start(settings, producer, watched: list, handler, name: str):
    """A watcher on `watched` and a running planner service."""
    watcher = Consumer(settings.kafka_bootstrap, settings.bus, watched, None, handler, producer, name)
    svc = PlannerService(settings)
    await asyncio.wait_for(watcher.start(), 30)
    await asyncio.wait_for(svc.start(wait_assigned_s=30), 40)
    return watcher, svc, [asyncio.create_task(watcher.run()), asyncio.create_task(svc.run())]


async def _stop(watcher, svc, tasks) -> None:
    watcher.stop()
    await svc.stop()
    _, pending = await asyncio.wait(tasks, timeout=15)
    for t in pending:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    await svc.close()


async def test_the_planners_warm_topology_follows_every_registry_write(topics_ready, registry):
    settings = topics_ready
    snap = grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2, spares=1)
    await registry.init_job(snap)
    svc = PlannerService(settings)
    first = await svc._plan_input()
    assert first is not None and svc._topology is not None
    # nothing written: the kept arrays are reused, meta read fresh
    await registry.record_committed_step(0, 7)
    again = await svc._plan_input()
    assert again.rank is first.rank and again.committed_step == 7
    # a fenced write moves the version: the next read sees the moved rank at once
    gen = await registry.bump_generation(0)
    moved = snap.ranks[0].model_copy(update={"node_id": "spare-0", "generation": gen})
    await registry.put_ranks(gen, [moved])
    after = await svc._plan_input()
    assert after.rank is not first.rank and after.generation == gen
    pos = int((after.rank == 0).nonzero()[0][0])
    assert after.node_ids[after.node_of[pos]] == "spare-0"
    await svc.registry.close()


async def _escalations_for(settings, producer, registry, incidents: list[FaultIncident]):
    """Run the planner, publish `incidents`, return (escalations, plans, service) once every
    incident is handled."""
    from flashrecovery.shared.schemas import Escalation

    seen: list = []

    async def on_event(event, _record) -> None:
        if isinstance(event, (Escalation, RecoveryPlan)) and event.job_id == settings.job_id:
            seen.append(event)

    watcher, svc, tasks = await _start(
        settings, producer, [topics.RECOVERY, topics.PLANS], on_event, "test-escalations"
    )
    try:
        await watcher.wait_assigned(30)
        for inc in incidents:
            await producer.publish(inc, wait=True)
        await wait_for(lambda: any(isinstance(e, Escalation) for e in seen), 30, "an escalation")
        await wait_for(lambda: svc.consumer.handled >= len(incidents), 30, "every incident handled")
        await asyncio.sleep(0.5)  # a plan, if one were published, would have landed
    finally:
        await _stop(watcher, svc, tasks)
    return ([e for e in seen if not isinstance(e, RecoveryPlan)], [e for e in seen if isinstance(e, RecoveryPlan)], svc)


async def test_lost_registry_escalates_loudly(topics_ready, producer, registry):
    # Issue #12: a Redis restart (empty) then a crash: no topology to plan from. Before, the
    # planner logged a warning and the job stalled silently.
    from flashrecovery.tools import _status

    settings = topics_ready
    escalations, plans, svc = await _escalations_for(
        settings, producer, registry, [incident(settings.job_id, "inc-lost", "node-1")]
    )
    assert plans == []
    [esc] = escalations
    want = f"registry has no topology for job {settings.job_id}: lost or never registered"
    assert esc.reason == want and esc.incident_ids == ("inc-lost",) and esc.plan_id is None
    assert [d["outcome"] for d in svc.decisions] == ["escalation"]
    rec = await registry.incident("inc-lost")
    assert rec["phase"] == "escalated" and rec["reason"] == want
    view = await _status(settings, 0)
    assert view["topology"] == "missing" and view["escalated"] == {"inc-lost": want}


async def test_lost_shard_escalates_and_marks_the_incident(topics_ready, producer, registry):
    # Issue #12 item 8: every replica of a shard gone and no checkpoint restore: an escalation,
    # visible on the recovery topic, in the registry and in `flashrecovery status`; no plan.
    from flashrecovery.tools import _status

    settings = topics_ready
    await registry.init_job(grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2, spares=2))
    both = incident(settings.job_id, "inc-both", "node-0").model_copy(update={"root_cause_nodes": ("node-0", "node-1")})
    escalations, plans, svc = await _escalations_for(settings, producer, registry, [both])
    assert plans == []
    [esc] = escalations
    assert "every replica of shard 0 lost and no checkpoint restore is implemented" in esc.reason
    rec = await registry.incident("inc-both")
    assert rec["phase"] == "escalated" and rec["reason"] == esc.reason
    view = await _status(settings, 0)
    assert view["escalated"] == {"inc-both": esc.reason}


async def test_a_plan_whose_publish_failed_is_sent_as_recorded(topics_ready, producer, registry):
    """The publish fails once (seen: the broker restarted under it) after the plan was recorded;
    the handler's retry must send the recorded plan. Its own fresh copy differs in timestamps,
    and the executor refuses a copy that differs from the one recorded under its id."""
    settings = topics_ready
    plans, watcher, svc, tasks = await _planner_for_grid(settings, producer, registry)
    real_publish = svc.producer.publish
    failed: list[str] = []

    async def publish_once_failing(event, **kw):
        if isinstance(event, RecoveryPlan) and not failed:
            failed.append(event.plan_id)
            await asyncio.sleep(0.01)  # the retry's copy gets other timestamps
            raise RuntimeError("broker away")
        return await real_publish(event, **kw)

    svc.producer.publish = publish_once_failing
    try:
        await producer.publish(incident(settings.job_id, "inc-1", "node-1"), wait=True)
        await wait_for(lambda: len(plans) >= 1, 30, "the plan, after the failed publish")
        assert failed == [plans[0].plan_id]
        stored = await registry.get_plan(plans[0].plan_id)
        assert stored is not None and RecoveryPlan.model_validate_json(stored) == plans[0]
    finally:
        await _stop(watcher, svc, tasks)
