"""The scale bench's simulated sidecars render their messages from byte templates: what they send
must be exactly what the real schema accepts, or the bench would measure dead-lettering."""

import asyncio

import orjson
import pytest

from flashrecovery.bench.simsidecars import SimCluster
from flashrecovery.shared import schemas as S


def _sim(monkeypatch, nodes=3, columns=True):
    monkeypatch.setenv("FLASHRECOVERY_JOB_ID", 'job-"q"')  # a job id that needs JSON escaping
    return SimCluster(nodes, 4, spares=1, lose=0, lose_at=999.0, columns=columns)


@pytest.mark.parametrize("columns", [True, False], ids=["rank-columns", "rank-objects"])
def test_templated_heartbeats_decode_with_the_real_schema(monkeypatch, columns):
    sim = _sim(monkeypatch, columns=columns)
    hb = S.decode(sim.beat("node-1"))
    assert isinstance(hb, S.NodeHeartbeat) and hb.job_id == 'job-"q"' and hb.node_id == "node-1"
    assert (hb.rank_columns is not None) is columns
    ranks = hb.rank_statuses()
    assert [r.rank for r in ranks] == [4, 5, 6, 7] and {r.state for r in ranks} == {S.RankState.RUNNING}
    assert [r.pid for r in ranks] == [100004, 100005, 100006, 100007] and ranks[0].step_time_s == 0.5
    assert S.decode(sim.beat("node-1")).seq == hb.seq + 1
    spare = S.decode(sim.beat("spare-0"))
    assert spare.role == S.NodeRole.SPARE and spare.standby_ready == 4
    assert all(r.rank is None and r.state == S.RankState.STANDBY for r in spare.rank_statuses())
    sim.pause()
    assert {r.state for r in S.decode(sim.beat("node-2")).rank_statuses()} == {S.RankState.PAUSED}


def _command(action, **kw):
    return S.ExecutorCommand(
        job_id='job-"q"',
        generation=1,
        producer="executor-0",
        command_id=f"c-{action}",
        plan_id="p",
        incident_id="i",
        action=action,
        **kw,
    )


@pytest.mark.parametrize("columns", [True, False], ids=["report-columns", "rank-objects"])
def test_acks_decode_and_only_named_nodes_report_recover_stages(monkeypatch, columns):
    sim = _sim(monkeypatch, columns=columns)
    sent: list[bytes] = []

    async def keep() -> None:
        sent.extend(sim._acks)
        sim._acks.clear()

    sim.flush_acks = keep
    replace = _command(S.CommandAction.REPLACE, assignments=(S.Assignment(rank=0, local_rank=0, node_id="spare-0"),))
    asyncio.run(sim.on_command(replace, None))
    assert S.decode(sim.beat("spare-0")).rank_statuses()[0].rank == 0  # the spare now beats for rank 0
    assert [r.rank for r in S.decode(sim.beat("node-0")).rank_statuses()] == [1, 2, 3]
    sent.clear()
    asyncio.run(sim.on_command(_command(S.CommandAction.RECOVER, resume_step=3, stage_nodes=("spare-0",)), None))
    acks = [S.decode(v) for v in sent]
    assert all(isinstance(a, S.CommandAck) and a.ok for a in acks)
    staged = {(a.node_id, a.stage) for a in acks}
    assert staged == {("spare-0", st) for st in ("rebuilt", "restored", "resumed", "verified")}
    verified = next(a for a in acks if a.stage == "verified")
    assert (verified.report_columns is not None) is columns
    assert [(r.rank, r.applied_step) for r in verified.report_rows()] == [(0, 3)]
    # a recover without stage_nodes (an older executor): every node reports every stage
    sent.clear()
    asyncio.run(
        sim.on_command(
            _command(S.CommandAction.RECOVER, resume_step=3).model_copy(update={"command_id": "c-recover-all"}), None
        )
    )
    assert {S.decode(v).node_id for v in sent} == {"node-0", "node-1", "node-2", "spare-0"} and len(sent) == 16
    assert orjson.loads(sent[0])["schema_version"] == S.SCHEMA_VERSION


def test_heartbeat_interval_is_declared_in_every_beat_and_sizes_the_detectors(monkeypatch):
    """The scale suite's --scale-heartbeat-interval: the detector declares a node lost after
    heartbeat_misses of the interval the beat declares, so the simulated beats must carry it;
    and the default number of detector instances follows the heartbeat rate, not the node count."""
    from flashrecovery.bench.scale import detectors_for

    monkeypatch.setenv("FLASHRECOVERY_JOB_ID", "job-i")
    sim = SimCluster(3, 4, spares=1, lose=0, lose_at=999.0, interval_s=0.25)
    assert S.decode(sim.beat("node-0")).interval_s == 0.25
    assert detectors_for(12500) == 2 and detectors_for(12500, 0.5) == 4 and detectors_for(125, 0.25) == 1


def test_a_pause_is_reported_by_the_named_nodes_only_without_the_killed_ranks(monkeypatch):
    sim = _sim(monkeypatch)
    sent: list[bytes] = []

    async def keep() -> None:
        sent.extend(sim._acks)
        sim._acks.clear()

    sim.flush_acks = keep
    pause = _command(S.CommandAction.PAUSE, kill_ranks=(5,), stage_nodes=("node-1",))
    asyncio.run(sim.on_command(pause, None))
    acks = [S.decode(v) for v in sent]
    assert [a.node_id for a in acks] == ["node-1"]
    assert [r.rank for r in acks[0].report_rows()] == [4, 6, 7]
