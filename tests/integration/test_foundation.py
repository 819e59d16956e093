"""Foundation against the real broker and Redis: schemas through the bus, dead letters,
generation fencing, and the incident compare-and-set."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import schemas as S
from flashrecovery.shared import topics as T
from flashrecovery.shared.registry import StaleGeneration
from flashrecovery.shared.topology import grid_topology

pytestmark = pytest.mark.timeout(60)


async def _collect(settings, producer, topic_list, publish, want: int, timeout_s: float = 20):
    got: list = []

    async def handle(event, record):
        got.append(event)

    c = busmod.Consumer(settings.kafka_bootstrap, settings.bus, topic_list, None, handle, producer, "test")
    await c.start()
    task = asyncio.create_task(c.run())
    try:
        await c.wait_assigned()
        await publish()
        async with asyncio.timeout(timeout_s):
            while len(got) < want:
                await asyncio.sleep(0.02)
    finally:
        c.stop()
        await asyncio.wait_for(task, 10)
    return got, c


def _heartbeat(seq: int) -> S.NodeHeartbeat:
    return S.NodeHeartbeat(
        job_id="j",
        generation=0,
        producer="sidecar-node-0",
        node_id="node-0",
        seq=seq,
        ranks=(
            S.RankStatus(rank=0, local_rank=0, pid=11, state=S.RankState.RUNNING, step=4, step_time_s=0.05),
            S.RankStatus(rank=1, local_rank=1, pid=12, state=S.RankState.RUNNING, step=4, step_time_s=0.06),
        ),
    )


async def test_batched_heartbeat_round_trips(topics_ready, producer):
    hb = _heartbeat(1)
    got, _ = await _collect(topics_ready, producer, [T.HEARTBEATS], lambda: producer.publish(hb, wait=True), want=1)
    assert got == [hb]
    assert isinstance(got[0], S.NodeHeartbeat) and len(got[0].ranks) == 2


async def test_bad_messages_are_dead_lettered_and_consumption_continues(topics_ready, producer):
    unknown_version = orjson.dumps({**_heartbeat(2).model_dump(mode="json"), "schema_version": 99})
    good = _heartbeat(3)

    async def publish():
        await producer.publish_raw(T.HEARTBEATS, b"{not json", key=b"node-0")
        await producer.publish_raw(T.HEARTBEATS, unknown_version, key=b"node-0")
        await producer.publish(good, wait=True)

    got, consumer = await _collect(topics_ready, producer, [T.HEARTBEATS], publish, want=1)
    assert got == [good]
    assert consumer.dead_lettered == 2
    letters: list = []

    async def read_letters():
        from aiokafka import AIOKafkaConsumer

        c = AIOKafkaConsumer(
            busmod.topic_name(T.DEAD_LETTER, topics_ready.bus),
            bootstrap_servers=topics_ready.kafka_bootstrap,
            auto_offset_reset="earliest",
        )
        await c.start()
        try:
            async with asyncio.timeout(20):
                while len(letters) < 2:
                    for recs in (await c.getmany(timeout_ms=200)).values():
                        letters.extend(S.DeadLetter.model_validate_json(r.value) for r in recs)
        finally:
            await c.stop()

    await read_letters()
    reasons = sorted(letter.reason for letter in letters)
    assert any("not JSON" in r for r in reasons)
    assert any("schema_version 99" in r for r in reasons)
    assert all(letter.raw_b64 for letter in letters)


async def test_write_from_an_old_generation_is_refused(registry, job_id):
    snap = grid_topology(job_id, nodes=2, ranks_per_node=2, tp=2)
    await registry.init_job(snap)
    assert await registry.bump_generation(0) == 1
    with pytest.raises(StaleGeneration):
        await registry.bump_generation(0)
    moved = snap.ranks[0].model_copy(update={"node_id": "spare-0", "generation": 0})
    with pytest.raises(StaleGeneration):
        await registry.put_ranks(0, [moved])
    await registry.put_ranks(1, [moved.model_copy(update={"generation": 1})])
    after = await registry.snapshot()
    assert after.generation == 1 and after.ranks[0].node_id == "spare-0"
    with pytest.raises(StaleGeneration):
        await registry.record_committed_step(0, 10)
    # a restart set's records are read by name, unknown ranks are skipped
    got = await registry.get_ranks([0, 3, 99])
    assert [(r.rank, r.node_id) for r in got] == [(0, "spare-0"), (3, snap.ranks[3].node_id)]
    assert await registry.get_ranks([]) == []
    # the whole job's placement without a record object per rank, and nodes read by name
    placement = (await registry.versioned_rank_nodes())[1]
    assert placement == {r.rank: ("spare-0" if r.rank == 0 else r.node_id) for r in snap.ranks}
    # a kept copy is returned as is until a rank or node record is written
    kept = await registry.versioned_rank_nodes()
    assert await registry.versioned_rank_nodes(kept) is kept
    await registry.put_ranks(1, [moved.model_copy(update={"node_id": snap.ranks[1].node_id, "generation": 1})])
    fresh = await registry.versioned_rank_nodes(kept)
    assert fresh is not kept and fresh[0] != kept[0] and fresh[1][0] == snap.ranks[1].node_id
    nodes = await registry.get_nodes(["spare-0", "nowhere"])
    assert [n.node_id for n in nodes] == ["spare-0"]
    assert await registry.get_nodes([]) == []


async def test_two_concurrent_writers_of_one_phase_cannot_both_win(registry, job_id):
    await registry.init_job(grid_topology(job_id, nodes=1, ranks_per_node=2, tp=2))
    ok, _ = await registry.incident_transition("inc-1", None, "pausing", 0)
    assert ok
    results = await asyncio.gather(
        *[registry.incident_transition("inc-1", "pausing", f"replacing-by-{i}", 0) for i in range(8)]
    )
    assert sum(1 for ok, _ in results if ok) == 1
    assert (await registry.incident("inc-1"))["phase"].startswith("replacing-by-")
    assert "inc-1" in await registry.open_incidents()
    ok, _ = await registry.incident_transition("inc-1", "pausing", "done", 0)
    assert not ok


async def test_rank_state_writes_outside_the_topology_or_ahead_of_the_generation_are_refused(registry, job_id):
    """A forged future-generation pause once left a rank 1000000000 `running` in the registry:
    rank records are written only for the topology's ranks and the registry's generation."""
    from flashrecovery.shared.registry import RefusedWrite
    from flashrecovery.shared.schemas import RankState

    snap = grid_topology(job_id, nodes=2, ranks_per_node=2, tp=2)
    await registry.init_job(snap)
    ghost = snap.ranks[0].model_copy(update={"rank": 10**9, "state": RankState.RUNNING})
    with pytest.raises(RefusedWrite):
        await registry.put_ranks(0, [ghost])
    with pytest.raises(RefusedWrite):
        await registry.put_ranks(10**6, [snap.ranks[1].model_copy(update={"generation": 10**6})])
    with pytest.raises(RefusedWrite):  # the record's own generation ahead
        await registry.put_ranks(0, [snap.ranks[1].model_copy(update={"generation": 5})])
    with pytest.raises(RefusedWrite):
        await registry.put_nodes(7, list(snap.nodes[:1]))
    with pytest.raises(RefusedWrite):
        await registry.mark_finished(10**9, 3)
    after = await registry.snapshot()
    assert [r.rank for r in after.ranks] == [0, 1, 2, 3] and after.ranks == snap.ranks
    assert await registry.r.hlen(registry.k.finished_ranks) == 0
    await registry.put_ranks(0, [snap.ranks[1].model_copy(update={"state": RankState.RUNNING})])
    assert (await registry.snapshot()).ranks[1].state is RankState.RUNNING
