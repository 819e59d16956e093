"""Hostile input through the real services on the real broker and Redis (issue #16): a 2 MB
message on the telemetry and incident topics, and forged worker events from a generation and
nodes the registry does not have. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from test_planner_service import _planner_for_grid, _stop, incident, wait_for

from flashrecovery.bench.detector_rig import running_detector
from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import (
    DeadLetter,
    FaultClass,
    NodeHeartbeat,
    RankState,
    RankStatus,
    WorkerExit,
    decode_dead_letter,
)
from flashrecovery.shared.topology import grid_topology

pytestmark = pytest.mark.timeout(90)

BIG = 2 * 1024 * 1024


async def _publish_big(settings, topic: T.Topic, key: bytes) -> bytes:
    """2 MB through a plain aiokafka producer that allows it, as an outside producer would."""
    raw = os.urandom(BIG)
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 * BIG)
    await asyncio.wait_for(p.start(), 30)
    try:
        await asyncio.wait_for(p.send_and_wait(busmod.topic_name(topic, settings.bus), raw, key=key), 30)
    finally:
        await p.stop()
    return raw


async def _dead_letters(settings, want: int, timeout_s: float = 20) -> list[DeadLetter]:
    c = AIOKafkaConsumer(
        busmod.topic_name(T.DEAD_LETTER, settings.bus),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(c.start(), 30)
    letters: list[DeadLetter] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(letters) < want:
                for recs in (await c.getmany(timeout_ms=200)).values():
                    letters.extend(decode_dead_letter(r.value) for r in recs)
    finally:
        await c.stop()
    return letters


async def test_a_2mb_message_is_dead_lettered_and_the_detector_keeps_detecting(topics_ready, producer):
    settings = topics_ready
    async with running_detector(settings, producer, "hostile") as (svc, watcher, job):
        job.start()
        await asyncio.sleep(1.5)
        raw = await _publish_big(settings, T.HEARTBEATS, b"node-0")
        await job.crash(3)
        await watcher.wait(lambda: watcher.incidents, 10, "the crash incident after the 2 MB message")
        assert watcher.incidents[0][1].root_cause_nodes == ("node-1",)
        assert svc._consumer.dead_lettered == 1 and svc._producer.dead_letter_failures == 0
    letter = (await _dead_letters(settings, 1))[0]
    assert letter.raw_truncated and letter.raw_size == BIG and letter.consumer == "detector"
    import hashlib

    assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()


async def test_a_2mb_message_is_dead_lettered_and_the_planner_keeps_planning(topics_ready, producer, registry):
    settings = topics_ready
    plans, watcher, svc, tasks = await _planner_for_grid(settings, producer, registry)
    try:
        await _publish_big(settings, T.INCIDENTS, settings.job_id.encode())
        await producer.publish(incident(settings.job_id, "inc-after-big", "node-1"), wait=True)
        await wait_for(lambda: plans, 30, "the plan after the 2 MB message")
        assert plans[0].incident_ids == ("inc-after-big",)
        assert svc.consumer.dead_lettered == 1 and not any(t.done() for t in tasks)
    finally:
        await _stop(watcher, svc, tasks)


def _forged_beat(job_id: str, node: str, ranks: tuple[int, ...], generation: int) -> NodeHeartbeat:
    return NodeHeartbeat(
        job_id=job_id,
        generation=generation,
        producer="forger",
        node_id=node,
        seq=10**9,
        ranks=tuple(
            RankStatus(rank=r, local_rank=i, pid=1, state=RankState.EXITED, generation=generation)
            for i, r in enumerate(ranks)
        ),
    )


async def test_forged_worker_events_do_not_blind_the_detector(topics_ready, producer, registry):
    """The issue's run: heartbeats and an exit with generation 10^6, from a node that does not
    exist and from a real one. No incident for them, the job's generation unmoved, and the next
    real crash is detected in generation 0."""
    settings = topics_ready
    await registry.init_job(grid_topology(settings.job_id, nodes=4, ranks_per_node=2, tp=2, spares=1))
    async with running_detector(settings, producer, "forged") as (svc, watcher, job):
        assert svc.topology is not None and svc.topology.world_size == 8
        job.start()
        await asyncio.sleep(1.5)
        for ev in (
            _forged_beat(settings.job_id, "ghost-node", (10**6,), 10**6),
            _forged_beat(settings.job_id, "node-2", (4, 5), 10**6),
            WorkerExit(
                job_id=settings.job_id,
                generation=10**6,
                producer="forger",
                node_id="ghost-node",
                rank=10**6,
                pid=1,
                signal=9,
            ),
        ):
            await producer.publish(ev, wait=True)
        await wait_for(lambda: svc.refused >= 3, 10, "the forged events to be refused")
        await asyncio.sleep(0.5)
        assert watcher.incidents == []
        await job.crash(3)
        await watcher.wait(lambda: watcher.incidents, 10, "the real crash incident")
        inc = watcher.incidents[0][1]
        assert inc.fault_class is FaultClass.PROCESS_CRASH and inc.root_cause_nodes == ("node-1",)
        assert inc.generation == 0 and len(watcher.incidents) == 1
    letters = await _dead_letters(settings, 3)
    assert all(letter.reason.startswith("untrusted: ") for letter in letters)
