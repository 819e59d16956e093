"""The executor lease's fence token against a real Redis: a new holder gets a higher token,
and every scripted write of an older holder is refused."""

from __future__ import annotations

import asyncio

import pytest

from flashrecovery.shared import registry as regmod
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.topology import grid_topology

pytestmark = pytest.mark.timeout(60)


async def test_a_new_lease_holder_gets_a_higher_token_and_a_renewal_keeps_it(registry):
    assert await registry.acquire_lease("executor", "0", 0.3) == 1
    assert await registry.acquire_lease("executor", "0", 0.3) == 1  # renewed: same token
    assert await registry.acquire_lease("executor", "1", 0.3) is None  # held by 0
    await asyncio.sleep(0.45)  # 0 stopped renewing: its lease expires
    assert await registry.acquire_lease("executor", "1", 0.3) == 2
    assert await registry.hold_lease("executor", "0", 0.3) is False


async def test_every_write_of_a_deposed_holder_is_refused(settings, registry):
    await registry.init_job(grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2))
    old = Registry.from_url(settings.redis_url, settings.job_id)
    new = Registry.from_url(settings.redis_url, settings.job_id)
    try:
        old.fence = ("executor", await old.acquire_lease("executor", "0", 0.2))
        await old.put_run("p1", {"phase_note": "x"})  # the holder writes freely
        await old.set_active_plan("p1")
        await asyncio.sleep(0.3)
        new.fence = ("executor", await new.acquire_lease("executor", "1", 5))
        assert new.fence[1] > old.fence[1]
        gen = await registry.generation()
        refused = {
            "run state": old.put_run("p1", {"x": 1}),
            "run phase": old.run_transition("p1", None, "fence", gen),
            "incident phase": old.incident_transition("i1", None, "recovering", gen),
            "generation bump": old.bump_generation(gen),
            "active plan": old.set_active_plan("p0"),
            "active plan clear": old.clear_active_plan("p1"),
            "side effect": old.side_effect_once("p1", "completed:done"),
            "committed step": old.record_committed_step(gen, 3),
            "rank records": old.put_ranks(gen, []),  # empty: nothing to write, nothing refused
            "fence check": old.check_fence(),
        }
        for what, write in refused.items():
            if what == "rank records":
                await write
                continue
            with pytest.raises(regmod.FencedOut):
                await write
        assert await registry.r.get(registry.k.active_plan) == b"p1"
        assert await registry.generation() == gen
        # the new holder, and writers that hold no lease (planner, detector), are not fenced
        await new.check_fence()
        assert await new.bump_generation(gen) == gen + 1
        assert (await registry.incident_transition("i1", None, "planned", gen + 1))[0]
        # an active plan is cleared only by the plan it names
        await new.clear_active_plan("p0")
        assert await registry.r.get(registry.k.active_plan) == b"p1"
        await new.clear_active_plan("p1")
        assert await registry.r.get(registry.k.active_plan) is None
        assert await new.side_effect_once("p1", "completed:done")
        assert not await new.side_effect_once("p1", "completed:done")
    finally:
        await old.close()
        await new.close()


def _plan(job_id, pid, incidents, target, at):
    from flashrecovery.shared.schemas import RecoveryPlan

    return RecoveryPlan(
        job_id=job_id,
        generation=target - 1,
        producer="t",
        plan_id=pid,
        emitted_at=at,
        incident_ids=tuple(incidents),
        target_generation=target,
        world_size=4,
        restart_ranks=(1,),
        faulty_nodes=(),
        replacements=(),
        transfers=(),
        recovery_step=1,
    )


async def _executor(settings, instance: str):
    from flashrecovery.executor.app import ExecutorService

    svc = ExecutorService(settings.model_copy(update={"instance": instance}))
    published: list = []

    async def publish(event, wait=False):
        published.append(event)

    svc.producer.publish = publish
    return svc, published


async def test_an_older_plan_is_not_driven_after_a_newer_one_finished(settings, registry):
    """Two ranks killed at once: plan A (one rank) and plan B (both), both from generation 0.
    B ran and finished; A, never started, must be retired, not driven next."""
    await registry.init_job(grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2))
    svc, published = await _executor(settings, "0")
    try:
        a = _plan(settings.job_id, "A", ["i1"], 1, 1.0)
        b = _plan(settings.job_id, "B", ["i1", "i2"], 1, 2.0)
        svc.plans = {"A": a, "B": b}
        for p in (a, b):  # the planner records every plan before publishing it
            await registry.put_plan_once(p.plan_id, p.model_dump_json().encode())
        await registry.bump_generation(0)
        await registry.run_transition("B", None, "done", 1)
        assert await svc._next_plan() is None
        assert (await registry.r.hget(registry.k.run("A"), "phase")) == b"superseded"
        assert [e.outcome for e in published] == ["superseded"]
    finally:
        await svc.registry.close()


async def test_losing_the_lease_cancels_the_drive(settings, registry):
    svc, _ = await _executor(settings, "0")
    try:
        await svc._lead_once()
        assert svc.leader
        drive = asyncio.create_task(asyncio.sleep(60))
        svc.driving = ("p", drive)
        await registry.r.delete(registry.k.lease("executor"))  # as if it expired while stopped
        assert await registry.hold_lease("executor", "1", 5)
        await svc._lead_once()
        assert not svc.leader and svc.driving is None and drive.cancelled()
        with pytest.raises(regmod.FencedOut):
            await svc._set_run("p", phase_note=1)  # and its writes are refused
    finally:
        await svc.registry.close()


def _spare_plan(job_id):
    """A sound plan for a 2 x 2 job with one spare: rank 1 moves from node-0 to spare-0."""
    from flashrecovery.shared.schemas import RecoveryPlan, Replacement, Transfer

    return RecoveryPlan(
        job_id=job_id,
        generation=0,
        producer="planner",
        plan_id="P",
        emitted_at=1.0,
        incident_ids=("i1",),
        target_generation=1,
        world_size=4,
        restart_ranks=(1,),
        faulty_nodes=("node-0",),
        transfers=(Transfer(src=3, dst=1),),
        recovery_step=0,
        replacements=(Replacement(rank=1, from_node="node-0", to_node="spare-0", local_rank=1),),
    )


@pytest.mark.parametrize("forge", ["absurd", "unrecorded", "forged-copy"])
async def test_an_invalid_plan_is_refused_before_the_first_command(settings, registry, forge):
    """A plan with restart_ranks [10^9] and world size -1 was fenced, paused, replaced and
    recovered, and left the job paused. Now: refused before anything (run failed, escalated),
    the generation unchanged, no command sent. Likewise a plan the planner never recorded, and
    a forged copy under a real plan's id."""
    from flashrecovery.shared.schemas import Escalation, ExecutorCommand, RecoveryCompleted

    await registry.init_job(grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2, spares=1))
    good = _spare_plan(settings.job_id)
    absurd = good.model_copy(update={"restart_ranks": (10**9,), "world_size": -1, "transfers": (), "replacements": ()})
    if forge == "absurd":
        plan = absurd
        await registry.put_plan_once(plan.plan_id, plan.model_dump_json().encode())
    elif forge == "unrecorded":
        plan = good
    else:
        await registry.put_plan_once(good.plan_id, good.model_dump_json().encode())
        plan = absurd  # the same id, other content
    svc, published = await _executor(settings, "0")
    try:
        await svc.on_plan(plan, None)
        await svc._lead_once()
        if svc.driving:
            await asyncio.wait_for(asyncio.gather(svc.driving[1], return_exceptions=True), 5)
        assert await registry.generation() == 0
        assert not [e for e in published if isinstance(e, ExecutorCommand)]
        assert svc.refused == 1
        if forge == "forged-copy":
            # the real plan is back, from the registry, and runs next
            assert svc.plans["P"] == good
        else:
            assert (await registry.r.hget(registry.k.run("P"), "phase")) == b"failed"
            assert [type(e) for e in published] == [Escalation, RecoveryCompleted]
            assert "invalid plan refused" in published[0].reason
    finally:
        if svc.driving:
            svc.driving[1].cancel()
            await asyncio.gather(svc.driving[1], return_exceptions=True)
        await svc.registry.close()


async def test_a_stage_wait_ends_for_a_sound_superseding_plan_not_a_forged_one(settings, registry):
    """With the in-band decision no node waits for a survivor that never answered its pause;
    the plan's RECOVER stage ends as soon as a newer plan covers its incidents, so the planner's
    superseding plan takes over at once. A forged plan covering them (never recorded by the
    planner) is refused and forgotten, and the stage keeps waiting."""
    import time

    await registry.init_job(grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2, spares=1))
    first = _spare_plan(settings.job_id)
    newer = first.model_copy(update={"plan_id": "Q", "emitted_at": 2.0, "incident_ids": ("i1", "i2")})
    svc, _ = await _executor(settings, "0")
    try:
        svc.lease_until = time.monotonic() + 60
        svc.plans = {"P": first, "Q": newer}  # Q was never recorded: a forgery
        outcome, acks = await svc._await_acks("P:recover:0", "rebuilt", frozenset({"node-1"}), 0, 0, 0.5, plan=first)
        assert outcome == "fail" and "no ack after" in acks["_reason"]
        assert "Q" not in svc.plans and svc.refused == 1
        await registry.put_plan_once("Q", newer.model_dump_json().encode())  # the planner's own
        svc.plans["Q"] = newer
        outcome, acks = await svc._await_acks("P:recover:0", "rebuilt", frozenset({"node-1"}), 0, 0, 30, plan=first)
        assert outcome == "fail" and acks["_reason"] == "superseded by Q while waiting"
    finally:
        await svc.registry.close()


async def test_a_leader_that_takes_over_in_the_recover_stages_sends_the_recover_command_again(settings, registry):
    """A leader killed 0.1 s into a recovery: the sidecars' acks of its RECOVER went out before
    the new leader subscribed, and a recover stage is never retried, so the new leader waited
    out the phase timeout and the plan failed (seen in the e2e scenario executor-leader-killed).
    Taking over, it sends the same command (same id, its own token): sidecars that acted on it
    replay their acks (CommandGate)."""
    import orjson

    from flashrecovery.executor.app import PhaseFailed

    await registry.init_job(grid_topology(settings.job_id, nodes=2, ranks_per_node=2, tp=2, spares=1))
    plan = _spare_plan(settings.job_id)
    await registry.put_plan_once(plan.plan_id, plan.model_dump_json().encode())
    quick = settings.model_copy(update={"executor": settings.executor.model_copy(update={"phase_timeout_s": 0.5})})
    svc, published = await _executor(quick, "1")
    try:
        await svc._lead_once()
        assert svc.leader
        # the run as the dead leader left it: RECOVER sent, its rebuild stage under way
        await svc._set_run(
            plan.plan_id,
            generation=1,
            recover_nodes=orjson.dumps(["node-0", "node-1", "spare-0"]).decode(),
            stage_nodes=orjson.dumps(["node-1", "spare-0"]).decode(),
            in_band=1,
            recover_command=f"{plan.plan_id}:recover:0",
        )
        with pytest.raises(PhaseFailed, match="no ack after"):  # nobody answers in this test
            await svc._recover_stage(plan, "rebuild", svc.log)
        again = [e for e in published if getattr(e, "command_id", None) == f"{plan.plan_id}:recover:0"]
        assert len(again) == 1, published
        assert again[0].fence_token == svc.token and again[0].in_band and again[0].generation == 1
        assert again[0].stage_nodes == ("node-1", "spare-0")
    finally:
        await svc.registry.close()
