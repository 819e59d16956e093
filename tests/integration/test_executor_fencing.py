"""The executor lease's fence token against a real Redis: a new holder gets a higher token,
and every scripted write of an older holder is refused."""

from __future__ import annotations

import asyncio

import pytest

from flashrecovery.shared.registry import FencedOut, Registry
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
            with pytest.raises(FencedOut):
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
