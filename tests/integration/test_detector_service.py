"""The detector against a real broker and Redis: simulated sidecars publish heartbeats, exits and
log lines on the bus; incidents are read back from the incidents topic. Every wait is bounded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from flashrecovery.bench.detector_rig import FakeJob, Watcher, running_detector
from flashrecovery.detector.app import DetectorService
from flashrecovery.shared import topics
from flashrecovery.shared.schemas import FaultClass, NodeRole, RepairAction

pytestmark = pytest.mark.timeout(120)

GLOO_PEER = (
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.1]:29500"
)


@pytest.fixture
async def rig(topics_ready, producer, registry):
    async with running_detector(topics_ready, producer, "itest") as (svc, watcher, job):
        yield svc, watcher, job, registry


async def warm_up(job: FakeJob, seconds: float = 2.0) -> None:
    job.start()
    await asyncio.sleep(seconds)


async def test_process_crash_within_a_second(rig) -> None:
    svc, watcher, job, _ = rig
    await warm_up(job)
    t = await job.crash(3)
    await watcher.wait(lambda: watcher.incidents, 5, "the crash incident")
    at, inc = watcher.incidents[0]
    assert inc.fault_class is FaultClass.PROCESS_CRASH and inc.action is RepairAction.RESTART_PROCESS
    assert inc.root_cause_nodes == ("node-1",) and inc.root_cause_ranks == (3,)
    assert at - t < 1.0


async def test_node_lost_after_three_missed_heartbeats(rig) -> None:
    svc, watcher, job, _ = rig
    await warm_up(job)
    job.silent.add("node-2")
    await watcher.wait(lambda: watcher.incidents, 8, "the node-lost incident")
    at, inc = watcher.incidents[0]
    assert inc.fault_class is FaultClass.NODE_LOST and inc.action is RepairAction.REPLACE_NODE
    assert inc.root_cause_nodes == ("node-2",) and inc.root_cause_ranks == (4, 5)
    assert at - job.last_beat["node-2"] < 3 * 1.0 + 1.0
    await asyncio.sleep(2.0)  # still silent: not reported again
    assert len(watcher.incidents) == 1


@pytest.mark.parametrize("columns", [False, True], ids=["rank-objects", "rank-columns"])
async def test_hang_within_threshold_plus_a_second(rig, columns) -> None:
    svc, watcher, job, _ = rig
    job.columns = columns  # both heartbeat forms carry what hang detection reads
    await warm_up(job)
    job.ranks[5].frozen = True
    stalled_since = job.ranks[5].last_advance
    await watcher.wait(lambda: watcher.incidents, 10, "the hang incident")
    at, inc = watcher.incidents[0]
    assert inc.fault_class is FaultClass.HANG
    assert inc.root_cause_nodes == ("node-2",) and inc.root_cause_ranks == (5,)
    threshold = svc.settings.detector.hang_floor_s  # 10 x 0.1 s p99 < 5 s floor
    assert threshold <= at - stalled_since < threshold + 1.0


@pytest.mark.parametrize(
    "lines, fault_class, action",
    [
        (
            ["NVRM: Xid (PCI:0000:3b:00): 79, pid=10002, GPU has fallen off the bus."],
            FaultClass.HARDWARE,
            RepairAction.REPLACE_NODE,
        ),
        (
            [
                "Traceback (most recent call last):",
                '  File "train.py", line 88, in step',
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB",
            ],
            FaultClass.OUT_OF_MEMORY,
            RepairAction.RESTART_PROCESS,
        ),
        (
            [
                "Traceback (most recent call last):",
                '  File "train.py", line 12, in load',
                "RuntimeError: corrupt batch header",
            ],
            FaultClass.SOFTWARE,
            RepairAction.RESTART_PROCESS,
        ),
    ],
)
async def test_log_signatures_within_a_second(rig, lines, fault_class, action) -> None:
    svc, watcher, job, _ = rig
    await warm_up(job, 1.5)
    first = None
    for line in lines:
        t = await job.log(2, line)
        first = first or t
    await watcher.wait(lambda: watcher.incidents, 5, f"the {fault_class.value} incident")
    at, inc = watcher.incidents[0]
    assert (inc.fault_class, inc.action, inc.root_cause_nodes) == (fault_class, action, ("node-1",))
    assert at - first < 1.0
    await asyncio.sleep(1.0)
    assert len(watcher.incidents) == 1


async def test_one_crash_with_seven_peer_symptoms_is_one_incident(rig) -> None:
    svc, watcher, job, _ = rig
    await warm_up(job)
    t = await job.crash(0)
    for rank in range(1, 8):
        await job.log(rank, GLOO_PEER)
    await watcher.wait(lambda: watcher.incidents, 5, "the crash incident")
    await asyncio.sleep(svc.settings.detector.correlation_window_s + 1.0)  # let any window expire
    assert len(watcher.incidents) == 1, [i for _, i in watcher.incidents]
    at, inc = watcher.incidents[0]
    assert inc.fault_class is FaultClass.PROCESS_CRASH and inc.root_cause_nodes == ("node-0",)
    assert inc.root_cause_ranks == (0,) and at - t < 1.0
    job_state = svc.state.jobs[svc.settings.job_id]
    assert job_state.incidents[inc.incident_id].symptoms == 7


async def test_unexplained_comm_errors_are_reported_without_action(rig) -> None:
    svc, watcher, job, _ = rig
    await warm_up(job, 1.5)
    for rank in (2, 6):
        await job.log(rank, "NCCL WARN NET/IB : Got completion with error 12, opcode 0, timeout")
    window = svc.settings.detector.correlation_window_s
    await asyncio.sleep(window - 0.5)
    assert watcher.incidents == []  # held for the window
    await watcher.wait(lambda: watcher.incidents, 3, "the communication incident")
    _, inc = watcher.incidents[0]
    assert inc.fault_class is FaultClass.COMMUNICATION and inc.action is RepairAction.NONE
    assert inc.confidence < 0.5 and inc.root_cause_nodes == ("node-1", "node-3")


@pytest.mark.parametrize("columns", [False, True], ids=["rank-objects", "rank-columns"])
async def test_straggler_degradation(rig, columns) -> None:
    svc, watcher, job, _ = rig
    job.columns = columns
    await warm_up(job, 1.5)
    job.ranks[6].dt = 0.5
    consecutive = svc.settings.detector.straggler_consecutive
    await watcher.wait(lambda: watcher.degradations, consecutive + 4, "the degradation")
    _, deg = watcher.degradations[0]
    assert (deg.node_id, deg.rank) == ("node-3", 6) and deg.step_time_s > 2 * deg.median_step_time_s
    assert watcher.incidents == []


async def test_fault_free_run_with_slow_step_and_long_phase_has_no_incident(rig) -> None:
    svc, watcher, job, registry = rig
    await warm_up(job, 3.0)
    job.slow_step(3.0)  # one 3 s step on every rank (well under the 5 s floor)
    await asyncio.sleep(5.0)
    job.long_phase("checkpoint", expected_s=10.0, actual_s=7.0)  # 7 s without a step: > floor
    await asyncio.sleep(9.0)
    assert watcher.incidents == [], [i for _, i in watcher.incidents]
    assert watcher.degradations == []
    assert svc.state.counters.get("stale_heartbeats", 0) == 0
    assert any(k.startswith("detector:itest") for k in await registry.live_services())
    assert svc.cfg.peer_grace_s == 0  # the only instance: no hang waits for a peer


async def test_malformed_input_is_dead_lettered_and_detection_goes_on(rig, producer) -> None:
    svc, watcher, job, _ = rig
    await warm_up(job, 1.5)
    await producer.publish_raw(topics.HEARTBEATS, b"{not json", key=b"node-0")
    await producer.publish_raw(topics.WORKER_EVENTS, b'{"schema_version": 99, "kind": "worker_exit"}', key=b"node-0")
    await job.crash(1)
    await watcher.wait(lambda: watcher.incidents, 5, "the crash incident")
    assert watcher.incidents[0][1].root_cause_nodes == ("node-0",)
    assert svc._consumer.dead_lettered == 2


async def test_second_instance_rebalance_no_false_incident_then_one_crash_incident(rig, producer) -> None:
    """A second detector joins the group: partitions split, each instance forgets the nodes it
    gave away (their silence there is not a node loss); a crash is still reported exactly once."""
    svc, watcher, job, _ = rig
    await warm_up(job)
    other = DetectorService(svc.settings, instance="itest-2")
    await asyncio.wait_for(other.start(), 30)
    task = asyncio.create_task(other.run())
    try:
        await watcher.wait(
            lambda: other._consumer._c.assignment() and len(svc._consumer._c.assignment()) < 8, 30, "the rebalance"
        )
        await asyncio.sleep(3 * job.interval + 2.0)  # long enough for a false node loss
        assert watcher.incidents == [], [i for _, i in watcher.incidents]
        await job.crash(7)
        await watcher.wait(lambda: watcher.incidents, 5, "the crash incident")
        await asyncio.sleep(1.0)
        assert [i.root_cause_nodes for _, i in watcher.incidents] == [("node-3",)]
    finally:
        await other.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        await other.close()


@dataclass
class NamedJob(FakeJob):
    """FakeJob with one rank per node and chosen node ids (so their partitions are known)."""

    names: tuple[str, ...] = ()

    def node_of(self, rank: int) -> str:
        return self.names[rank]


async def test_two_instances_crash_at_one_symptoms_at_the_other_give_one_incident(topics_ready, producer) -> None:
    """Two detectors in one group split the partitions; the crashed node's partition belongs to
    A, the seven peers logging 'connection closed by peer' to B. B reads A's incident from the
    incidents topic and attributes its held symptoms to it: one incident across both."""
    from aiokafka.partitioner import DefaultPartitioner

    settings = topics_ready
    watcher = Watcher(settings, producer)
    await asyncio.wait_for(watcher.consumer.start(), 30)
    a = DetectorService(settings, instance="peer-a")
    b = DetectorService(settings, instance="peer-b")
    tasks = [asyncio.create_task(watcher.consumer.run())]
    job = None
    try:
        await asyncio.wait_for(a.start(), 30)
        tasks.append(asyncio.create_task(a.run()))
        await a.wait_assigned(30)
        await asyncio.wait_for(b.start(), 30)
        tasks.append(asyncio.create_task(b.run()))
        await watcher.consumer.wait_assigned(30)
        hb = f"{settings.bus.topic_namespace}.{topics.HEARTBEATS.name}"
        n = settings.bus.telemetry_partitions

        def owned(svc: DetectorService) -> set[int]:
            return {tp.partition for tp in svc._consumer._c.assignment() if tp.topic == hb}

        def settled() -> bool:
            pa, pb = owned(a), owned(b)
            return bool(pa) and bool(pb) and not pa & pb and len(pa | pb) == n

        await watcher.wait(settled, 40, "the group to split the partitions")
        pa, pb = owned(a), owned(b)
        part = DefaultPartitioner()
        parts = list(range(n))
        candidates = [f"node-{i}" for i in range(400)]
        crashed = next(c for c in candidates if part(c.encode(), parts, parts) in pa)
        peers = [c for c in candidates if part(c.encode(), parts, parts) in pb][:7]
        job = NamedJob(producer, settings.job_id, nodes=8, ranks_per_node=1, names=(crashed, *peers))
        await warm_up(job, 2.5)
        assert settled(), (owned(a), owned(b))  # no rebalance under our feet
        assert a.cfg.peer_grace_s > 0 and b.cfg.peer_grace_s > 0  # partial owners: hangs wait
        t = await job.crash(0)
        for rank in range(1, 8):
            await job.log(rank, GLOO_PEER)
        await watcher.wait(lambda: watcher.incidents, 5, "the crash incident")
        window = settings.detector.correlation_window_s
        await asyncio.sleep(window + 1.5)  # past the window: B's held symptoms would be out
        assert len(watcher.incidents) == 1, [i for _, i in watcher.incidents]
        at, inc = watcher.incidents[0]
        assert inc.fault_class is FaultClass.PROCESS_CRASH and inc.root_cause_nodes == (crashed,)
        assert inc.producer == "detector/peer-a" and at - t < 1.0
        assert [e.incident_id for e in a.published] == [inc.incident_id] and b.published == []
        mirror = b.state.jobs[settings.job_id].incidents[inc.incident_id]
        assert mirror.origin == "detector/peer-a" and mirror.symptoms == 7
    finally:
        if job is not None:
            await job.stop()
        for svc in (a, b):
            await svc.stop()
        watcher.consumer.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for svc in (a, b):
            await svc.close()


async def test_nodes_that_die_during_a_handover_are_reported_by_the_new_owner(topics_ready, producer, registry) -> None:
    """A alone watches 8 nodes (two per partition). One node per partition goes silent, then B
    joins and takes some partitions over; their silent nodes' last beats were read (and
    committed) by A, so B only knows them from the registry topology. Every silent node is
    reported lost exactly once, by the instance that owns it after the split."""
    from aiokafka.partitioner import DefaultPartitioner

    from flashrecovery.shared.settings import DetectorSettings
    from flashrecovery.shared.topology import JobSnapshot, NodeRecord, RankRecord

    # 8 misses: A must not report a silent node before handing its partition over.
    settings = topics_ready.model_copy(update={"detector": DetectorSettings(heartbeat_misses=8)})
    n = settings.bus.telemetry_partitions
    part = DefaultPartitioner()
    parts = list(range(n))
    by_part: dict[int, list[str]] = {p: [] for p in parts}
    for i in range(400):
        name = f"node-{i}"
        p = part(name.encode(), parts, parts)
        if len(by_part[p]) < 2:
            by_part[p].append(name)
    names = tuple(name for p in parts for name in by_part[p])
    silent = {by_part[p][0]: p for p in parts}
    await registry.init_job(
        JobSnapshot(
            job_id=settings.job_id,
            generation=0,
            committed_step=-1,
            world_size=len(names),
            dp=len(names),
            tp=1,
            ranks=tuple(RankRecord(rank=i, node_id=nm, local_rank=0, shard_id=0, dp=i) for i, nm in enumerate(names)),
            nodes=tuple(NodeRecord(node_id=nm, role=NodeRole.ACTIVE, ranks=(i,)) for i, nm in enumerate(names)),
        )
    )
    watcher = Watcher(settings, producer)
    await asyncio.wait_for(watcher.consumer.start(), 30)
    a = DetectorService(settings, instance="hand-a")
    b = DetectorService(settings, instance="hand-b")
    tasks = [asyncio.create_task(watcher.consumer.run())]
    job = NamedJob(producer, settings.job_id, nodes=len(names), ranks_per_node=1, names=names)
    try:
        await asyncio.wait_for(a.start(), 30)
        tasks.append(asyncio.create_task(a.run()))
        await a.wait_assigned(30)
        await watcher.consumer.wait_assigned(30)
        await warm_up(job, 3.0)
        job.silent |= set(silent)
        await asyncio.wait_for(b.start(), 30)
        tasks.append(asyncio.create_task(b.run()))
        hb = f"{settings.bus.topic_namespace}.{topics.HEARTBEATS.name}"

        def owned(svc: DetectorService) -> set[int]:
            return {tp.partition for tp in svc._consumer._c.assignment() if tp.topic == hb}

        await watcher.wait(
            lambda: owned(a) and owned(b) and not owned(a) & owned(b) and len(owned(a) | owned(b)) == n,
            30,
            "the group to split",
        )
        pa, pb = owned(a), owned(b)
        await watcher.wait(lambda: len(watcher.incidents) >= len(silent), 30, "a node-lost incident per silent node")
        await asyncio.sleep(2.0)  # no duplicates trailing
        got = sorted((i.root_cause_nodes, i.producer) for _, i in watcher.incidents)
        want = sorted(((nm,), "detector/hand-a" if p in pa else "detector/hand-b") for nm, p in silent.items())
        assert got == want, (got, want, pa, pb)
        assert all(i.fault_class is FaultClass.NODE_LOST for _, i in watcher.incidents)
    finally:
        await job.stop()
        for svc in (a, b):
            await svc.stop()
        watcher.consumer.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for svc in (a, b):
            await svc.close()
