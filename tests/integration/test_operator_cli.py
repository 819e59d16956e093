"""The operator commands against a real broker, Redis and planner: a job registered and a spare
added with the CLI; the spare quarantined, so a node loss finds no place (the plan waits); the
spare released, so the next node loss moves its ranks onto it. Plus `health` from the liveness
keys and `deadletters` from the topic, which no reader re-dead-letters."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from test_planner_service import _start, _stop, incident, wait_for

from flashrecovery.shared import topics
from flashrecovery.shared.schemas import Fallback, NodeRole, RecoveryPlan

pytestmark = pytest.mark.timeout(120)


async def cli(settings, *argv: str) -> subprocess.CompletedProcess:
    """`flashrecovery ARGV` in a child process (the event loop keeps the planner running)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHRECOVERY_")}
    env.update(
        FLASHRECOVERY_REDIS_URL=settings.redis_url,
        FLASHRECOVERY_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        FLASHRECOVERY_JOB_ID=settings.job_id,
        FLASHRECOVERY_BUS__TOPIC_NAMESPACE=settings.bus.topic_namespace,
        FLASHRECOVERY_LOG_FORMAT="json",
    )
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "flashrecovery", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_released_node_absorbs_the_next_replacement(topics_ready, producer, registry):
    settings = topics_ready
    res = await cli(settings, "job", "register", "--nodes", "2", "--ranks-per-node", "2", "--spares", "0")
    assert res.returncode == 0 and "world 4" in res.stdout, res.stderr
    again = await cli(settings, "job", "register", "--nodes", "2", "--ranks-per-node", "2", "--spares", "0")
    assert again.returncode == 0 and "already registered with this topology" in again.stdout
    other = await cli(settings, "job", "register", "--nodes", "4", "--ranks-per-node", "2")
    assert other.returncode == 1 and "already registered" in other.stderr
    assert (await cli(settings, "node", "add-spare", "spare-a", "--capacity", "2")).returncode == 0
    res = await cli(settings, "node", "quarantine", "spare-a", "--reason", "bad DIMM")
    assert res.returncode == 0 and "quarantined" in res.stdout, res.stderr
    refused = await cli(settings, "node", "quarantine", "node-0", "--reason", "x")
    assert refused.returncode == 1 and "hosts ranks [0, 1]" in refused.stderr
    assert "bad DIMM" in (await registry.quarantine_notes())["spare-a"]
    view = await cli(settings, "status", "--json", "--listen", "0")
    assert view.returncode == 0, view.stderr[-2000:]
    assert "bad DIMM" in json.loads(view.stdout)["nodes"][-1]["quarantine_note"]

    plans: list[RecoveryPlan] = []

    async def on_plan(event, _record) -> None:
        if isinstance(event, RecoveryPlan):
            plans.append(event)

    running = await _start(settings, producer, [topics.PLANS], on_plan, "test-plans")
    try:
        await running[0].wait_assigned(30)
        assert (await cli(settings, "health", "--service", "planner")).returncode == 0
        assert (await cli(settings, "health", "--service", "executor")).returncode == 1

        # Quarantined: the planner has nowhere to put node-1's ranks.
        await producer.publish(incident(settings.job_id, "inc-1", "node-1"), wait=True)
        await wait_for(lambda: len(plans) >= 1, 30, "the first plan")
        assert plans[0].fallback is Fallback.WAIT and not plans[0].replacements, plans[0]
        # What the executor does with a waiting plan: it ends failed ("waiting for capacity").
        ok, why = await registry.incident_transition("inc-1", "planned", "failed", 0)
        assert ok, why

        res = await cli(settings, "node", "release", "spare-a")
        assert res.returncode == 0 and "spare, standby slots 2" in res.stdout, res.stderr
        spare = (await registry.get_nodes(["spare-a"]))[0]
        assert spare.role is NodeRole.SPARE and spare.standby_slots == 2
        assert "spare-a" not in await registry.quarantine_notes()

        await producer.publish(incident(settings.job_id, "inc-2", "node-0"), wait=True)
        await wait_for(lambda: len(plans) >= 2, 30, "the plan after the release")
        p = plans[-1]
        assert p.incident_ids == ("inc-2",) and p.fallback is Fallback.NONE, p
        assert {(r.rank, r.to_node) for r in p.replacements} == {(0, "spare-a"), (1, "spare-a")}
    finally:
        await _stop(*running)


async def test_deadletters_lists_reasons_and_nobody_re_dead_letters_them(topics_ready, producer):
    settings = topics_ready
    running = await _start(settings, producer, [topics.PLANS], lambda *_: asyncio.sleep(0), "test-plans")
    try:
        await producer.publish_raw(topics.INCIDENTS, b"not json at all", key=b"k")  # the planner's to judge
        await producer.publish_raw(topics.DEAD_LETTER, b"garbage on the dead-letter topic itself")

        async def count() -> tuple[int, str]:
            res = await cli(settings, "deadletters")
            assert res.returncode == 0, res.stderr
            return int(res.stdout.splitlines()[-1].split()[0]), res.stdout

        async def letters_settle() -> tuple[int, str]:
            for _ in range(100):
                n, out = await count()
                if "not JSON" in out:
                    return n, out
                await asyncio.sleep(0.3)
            raise AssertionError("the planner's dead letter never showed up")

        n, out = await letters_settle()
        assert n == 2 and "consumer=planner" in out and "unreadable record" in out, out
        # A reader of the dead-letter topic (`events --topics deadletter`) must not feed it.
        ev = await cli(settings, "events", "--topics", "deadletter", "--seconds", "3")
        assert ev.returncode == 0 and "dead_letter" in ev.stdout, ev.stderr[-2000:]
        await asyncio.sleep(1.0)
        assert (await count())[0] == 2
    finally:
        await _stop(*running)
