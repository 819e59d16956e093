"""Signed messages on the real broker (issue #16, shared/signing.py): a planner with a
keyring plans only from incidents tagged with an accepted key; an unsigned or forged incident is
dead-lettered with the reason and nothing is planned; the plans it publishes carry valid tags."""

from __future__ import annotations

import asyncio

import pytest
from test_hostile_bus import _dead_letters
from test_planner_service import _planner_for_grid, _stop, incident, wait_for

from flashrecovery.shared import bus as busmod
from flashrecovery.shared.signing import write_key_file

pytestmark = pytest.mark.timeout(120)


def _with_keys(settings, key_file) -> object:
    return settings.model_copy(update={"bus": settings.bus.model_copy(update={"signing_key_file": str(key_file)})})


async def _producer(settings) -> busmod.Producer:
    p = busmod.Producer(settings.kafka_bootstrap, settings.bus)
    await asyncio.wait_for(p.start(), 30)
    return p


async def test_the_planner_acts_only_on_incidents_tagged_with_an_accepted_key(
    topics_ready, producer, registry, tmp_path
):
    signed = _with_keys(topics_ready, write_key_file(tmp_path / "keys.json"))
    forger = _with_keys(topics_ready, write_key_file(tmp_path / "other.json"))  # same key id, other key
    signed_producer, forged_producer = await _producer(signed), await _producer(forger)
    plans, watcher, svc, tasks = await _planner_for_grid(signed, signed_producer, registry)
    try:
        await producer.publish(incident(signed.job_id, "inc-unsigned", "node-1"), wait=True)
        await forged_producer.publish(incident(signed.job_id, "inc-forged", "node-2"), wait=True)
        letters = await _dead_letters(signed, 2, timeout_s=30)
        reasons = sorted(letter.reason for letter in letters)
        assert reasons[0].startswith("unauthenticated: forged"), reasons
        assert reasons[1].startswith("unauthenticated: unsigned"), reasons
        assert svc.consumer.unauthenticated == 2 and not plans

        await signed_producer.publish(incident(signed.job_id, "inc-signed", "node-3"), wait=True)
        # The watcher checks tags too: the plan arrives only if the planner signed it.
        await wait_for(lambda: plans, 30, "the plan of the signed incident")
        assert [p.incident_ids for p in plans] == [("inc-signed",)]
        assert watcher.unauthenticated == 0
    finally:
        await _stop(watcher, svc, tasks)
        await signed_producer.stop()
        await forged_producer.stop()
