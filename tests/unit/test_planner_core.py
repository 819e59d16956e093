"""Table-driven tests of the pure planner core: fixed timestamps, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from flashrecovery.planner import NoPlan, PlanInput, Policy, plan, plan_id_for
from flashrecovery.shared.schemas import (
    Escalation,
    Fallback,
    FaultClass,
    FaultIncident,
    NodeRole,
    RankState,
    RecoveryPlan,
    RepairAction,
)
from flashrecovery.shared.settings import ConfigError, PlannerSettings, load_settings
from flashrecovery.shared.topology import JobSnapshot, NodeRecord, grid_topology

JOB = "job"
NOW = 10_000.0
REPLACE, RESTART, NONE = RepairAction.REPLACE_NODE, RepairAction.RESTART_PROCESS, RepairAction.NONE


def inc(
    iid: str,
    nodes: tuple[str, ...] = (),
    action: RepairAction = REPLACE,
    ranks: tuple[int, ...] = (),
    at: float = NOW - 1,
    job: str = JOB,
) -> FaultIncident:
    cls = FaultClass.NODE_LOST if action == REPLACE else FaultClass.SOFTWARE
    return FaultIncident(
        job_id=job,
        generation=0,
        producer="t",
        incident_id=iid,
        fault_class=cls,
        action=action,
        root_cause_nodes=nodes,
        root_cause_ranks=ranks,
        first_seen_at=at,
        detected_at=at,
    )


def grid(nodes: int = 4, rpn: int = 2, tp: int = 2, pp: int = 1, spares: int = 1, **kw) -> JobSnapshot:
    snap = grid_topology(JOB, nodes=nodes, ranks_per_node=rpn, tp=tp, pp=pp, spares=spares, **kw)
    return snap.model_copy(update={"committed_step": 41, "generation": 3})


def with_nodes(snap: JobSnapshot, **changes: dict) -> JobSnapshot:
    nodes = tuple(n.model_copy(update=changes[n.node_id]) if n.node_id in changes else n for n in snap.nodes)
    return snap.model_copy(update={"nodes": nodes})


def with_rank_state(snap: JobSnapshot, state: RankState, ranks: set[int], node: str | None = None) -> JobSnapshot:
    recs = tuple(
        r.model_copy(update={"state": state, **({"node_id": node} if node else {})}) if r.rank in ranks else r
        for r in snap.ranks
    )
    return snap.model_copy(update={"ranks": recs})


def check_sources(snap: JobSnapshot, p: RecoveryPlan) -> None:
    shard = {r.rank: r.shard_id for r in snap.ranks}
    node = {r.rank: r.node_id for r in snap.ranks}
    restarted = set(p.restart_ranks)
    assert sorted(t.dst for t in p.transfers) == sorted(restarted)
    for t in p.transfers:
        assert shard[t.src] == shard[t.dst]
        assert t.src not in restarted and node[t.src] not in p.faulty_nodes


# ------------------------------------------------------------------ the ordinary plans

CASES = [
    # id, snapshot, incidents, policy, restart ranks, {rank: (to_node, mode)}
    (
        "node lost -> spare, together",
        grid(),
        [inc("a", ("node-1",))],
        Policy(),
        (2, 3),
        {2: ("spare-0", "standby"), 3: ("spare-0", "standby")},
    ),
    (
        "software -> in place (default: the node's warm standby)",
        grid(),
        [inc("a", ("node-2",), RESTART, (5,))],
        Policy(),
        (5,),
        {5: ("node-2", "in_place")},
    ),
    (
        "software -> a spare's standby by policy",
        grid(),
        [inc("a", ("node-2",), RESTART, (5,))],
        Policy(restart_in_place_for_software=False),
        (5,),
        {5: ("spare-0", "standby")},
    ),
    (
        "software, no spare -> in place",
        grid(spares=0),
        [inc("a", ("node-2",), RESTART, (5,))],
        Policy(restart_in_place_for_software=False),
        (5,),
        {5: ("node-2", "in_place")},
    ),
    (
        "software, no ranks named -> whole node",
        grid(),
        [inc("a", ("node-2",), RESTART)],
        Policy(restart_in_place_for_software=False),
        (4, 5),
        {4: ("spare-0", "standby"), 5: ("spare-0", "standby")},
    ),
    (
        "replace by ranks only",
        grid(),
        [inc("a", (), REPLACE, (6,))],
        Policy(),
        (6, 7),
        {6: ("spare-0", "standby"), 7: ("spare-0", "standby")},
    ),
    (
        "two nodes, two spares",
        grid(spares=2),
        [inc("a", ("node-0",)), inc("b", ("node-3",))],
        Policy(),
        (0, 1, 6, 7),
        {0: ("spare-0", "standby"), 1: ("spare-0", "standby"), 6: ("spare-1", "standby"), 7: ("spare-1", "standby")},
    ),
    (
        "replace wins over restart on one node",
        grid(),
        [inc("a", ("node-1",)), inc("b", ("node-1",), RESTART, (3,))],
        Policy(),
        (2, 3),
        {2: ("spare-0", "standby"), 3: ("spare-0", "standby")},
    ),
]


@pytest.mark.parametrize("name,snap,incs,policy,restart,moves", CASES, ids=[c[0] for c in CASES])
def test_plans(name, snap, incs, policy, restart, moves):
    p = plan(snap, incs, policy, NOW)
    assert isinstance(p, RecoveryPlan), p
    assert p.fallback == Fallback.NONE
    assert p.restart_ranks == restart
    assert {r.rank: (r.to_node, r.mode) for r in p.replacements} == moves
    local = {r.rank: r.local_rank for r in snap.ranks}
    assert all(r.local_rank == local[r.rank] for r in p.replacements)
    assert p.recovery_step == 42 and p.target_generation == 4 and p.generation == 3
    assert p.world_size == snap.world_size and p.supersedes is None
    assert p.rebuild_groups[0] == "global"
    assert p.emitted_at == NOW and p.event_id == p.plan_id
    check_sources(snap, p)


def test_rebuild_groups_name_only_changed_groups():
    snap = grid(nodes=8, rpn=4, tp=2, pp=2)
    p = plan(snap, [inc("a", ("node-1",))], Policy(), NOW)
    # node-1 holds ranks 4..7: dp index 1, tp 0/1, pp 0/1
    assert p.rebuild_groups == (
        "global",
        "dp:shard=0",
        "dp:shard=1",
        "dp:shard=2",
        "dp:shard=3",
        "tp:dp=1,pp=0",
        "tp:dp=1,pp=1",
        "pp:dp=1,tp=0",
        "pp:dp=1,tp=1",
    )


def test_sources_spread_over_nodes_and_balanced():
    snap = grid(nodes=8, rpn=4, tp=4, spares=2)  # dp=8, one replica of each shard per node
    p = plan(snap, [inc("a", ("node-2",)), inc("b", ("node-5",))], Policy(), NOW)
    assert isinstance(p, RecoveryPlan)
    check_sources(snap, p)
    node = {r.rank: r.node_id for r in snap.ranks}
    per_node: dict[str, int] = {}
    for t in p.transfers:
        per_node[node[t.src]] = per_node.get(node[t.src], 0) + 1
    # 8 restores over the 6 healthy nodes: every node serves, none more than one extra
    assert len(per_node) == 6 and max(per_node.values()) - min(per_node.values()) <= 1
    loads = {}
    for t in p.transfers:
        loads[t.src] = loads.get(t.src, 0) + 1
    assert max(loads.values()) == 1


def test_more_restores_than_replicas_stay_balanced():
    snap = grid(nodes=3, rpn=2, tp=1, spares=2)  # dp=6, all one shard
    p = plan(snap, [inc("a", ("node-0",)), inc("b", ("node-1",))], Policy(), NOW)
    loads = {}
    for t in p.transfers:
        loads[t.src] = loads.get(t.src, 0) + 1
    assert sorted(loads) == [4, 5] and sorted(loads.values()) == [2, 2]


# ------------------------------------------------------------------ placement


def test_locality_prefers_same_rack():
    labels = {"node-1": {"rack": "r2"}, "spare-0": {"rack": "r1"}, "spare-1": {"rack": "r2"}}
    p = plan(grid(spares=2, labels=labels), [inc("a", ("node-1",))], Policy(), NOW)
    assert {r.to_node for r in p.replacements} == {"spare-1"}
    assert any("same rack" in r for r in p.reasons)


def test_best_fit_keeps_big_spare_free():
    snap = with_nodes(grid(spares=2), **{"spare-0": {"standby_slots": 8}, "spare-1": {"standby_slots": 2}})
    p = plan(snap, [inc("a", ("node-1",))], Policy(), NOW)
    assert {r.to_node for r in p.replacements} == {"spare-1"}


def test_split_when_no_spare_holds_a_whole_node():
    snap = grid(spares=2, standby_slots=1)
    p = plan(snap, [inc("a", ("node-1",))], Policy(), NOW)
    assert isinstance(p, RecoveryPlan) and p.fallback == Fallback.NONE
    assert sorted(r.to_node for r in p.replacements) == ["spare-0", "spare-1"]
    assert any("split" in r for r in p.reasons)


def test_quarantined_and_faulty_spares_never_used():
    snap = with_nodes(grid(spares=3), **{"spare-0": {"role": NodeRole.QUARANTINED}})
    p = plan(snap, [inc("a", ("node-1",)), inc("b", ("spare-1",))], Policy(), NOW)
    assert {r.to_node for r in p.replacements} == {"spare-2"}


# ------------------------------------------------------------------ quarantine


def test_repeat_fault_quarantines_node_and_moves_all_its_ranks():
    history = {"node-2": {"old": NOW - 100.0}}
    p = plan(
        grid(),
        [inc("a", ("node-2",), RESTART, (5,))],
        Policy(restart_in_place_for_software=True),
        NOW,
        fault_history=history,
    )
    assert p.quarantine_nodes == ("node-2",)
    assert p.restart_ranks == (4, 5)
    assert {(r.to_node, r.mode) for r in p.replacements} == {("spare-0", "standby")}


def test_old_faults_outside_window_do_not_quarantine():
    history = {"node-2": {"old": NOW - 7200.0}}
    p = plan(grid(), [inc("a", ("node-2",))], Policy(), NOW, fault_history=history)
    assert p.quarantine_nodes == ()


def test_replayed_incident_counts_once():
    history = {"node-2": {"a": NOW - 1}}  # the shell already recorded this same incident
    p = plan(grid(), [inc("a", ("node-2",))], Policy(), NOW, fault_history=history)
    assert p.quarantine_nodes == ()


def test_policy_from_settings():
    pol = Policy.from_settings(PlannerSettings(no_spare_policy="wait", quarantine_faults=3), checkpoint_step=7)
    assert (pol.no_spare_policy, pol.quarantine_faults, pol.checkpoint_step) == ("wait", 3, 7)


def test_shrink_is_refused_at_configuration_time(monkeypatch):
    # Issue #12 item 8: SHRINK has no rank renumbering or transfers behind it; refuse it loudly.
    with pytest.raises(ValidationError, match="no_spare_policy[\\s\\S]*'shrink' is not supported yet"):
        PlannerSettings(no_spare_policy="shrink")
    monkeypatch.setenv("FLASHRECOVERY_PLANNER__NO_SPARE_POLICY", "shrink")
    with pytest.raises(ConfigError, match="FLASHRECOVERY_PLANNER__NO_SPARE_POLICY.*not supported yet"):
        load_settings()
    with pytest.raises(ValueError, match="not supported yet"):
        Policy(no_spare_policy="shrink")


# ------------------------------------------------------------------ fallbacks


def test_no_spare_wait():
    p = plan(grid(spares=0), [inc("a", ("node-1",))], Policy(), NOW)
    assert p.fallback == Fallback.WAIT and p.replacements == () and p.restart_ranks == (2, 3)
    assert any("capacity" in r for r in p.reasons)


@pytest.mark.parametrize("ckpt", [30, None])
def test_lost_shard_escalates_instead_of_a_checkpoint_plan(ckpt):
    # Issue #12 item 8: no checkpoint restore is implemented, so no CHECKPOINT plan is driven.
    snap = grid(nodes=2, rpn=2, tp=2, spares=2)  # dp=2: shard s lives on node-0 and node-1
    d = plan(snap, [inc("a", ("node-0",)), inc("b", ("node-1",))], Policy(checkpoint_step=ckpt), NOW)
    assert isinstance(d, Escalation) and d.incident_ids == ("a", "b") and d.plan_id is None
    assert "every replica of shard 0 lost and no checkpoint restore is implemented" in d.reason
    assert d.event_id.startswith("esc-") and d.generation == 3
    assert (
        plan(snap, [inc("b", ("node-1",)), inc("a", ("node-0",))], Policy(checkpoint_step=ckpt), NOW) == d
    )  # deterministic: a replay escalates once (same event id)


# ------------------------------------------------------------------ no plan, supersede, recovering


@pytest.mark.parametrize(
    "incs,why",
    [
        ([inc("a", ("spare-0",))], "no node or rank"),
        ([inc("a", ("node-9",))], "unknown nodes"),
        ([inc("a", ("node-1",), NONE)], "nothing to restart"),
        ([inc("a", ("node-1",), job="other")], "no incident for this job"),
    ],
)
def test_no_plan(incs, why):
    d = plan(grid(), incs, Policy(), NOW)
    assert isinstance(d, NoPlan) and any(why in r for r in d.reasons), d


def test_inert_incidents_reported_for_closing():
    d = plan(grid(), [inc("a", ("spare-0",))], Policy(), NOW)
    assert d.inert == ("a",)


def test_superseding_plan_covers_union():
    snap = grid(spares=2)
    first = plan(snap, [inc("a", ("node-1",))], Policy(), NOW)
    second = plan(snap, [inc("a", ("node-1",)), inc("b", ("node-3",))], Policy(), NOW + 1, active_plan=first)
    assert second.supersedes == first.plan_id and second.plan_id != first.plan_id
    assert second.incident_ids == ("a", "b") and second.restart_ranks == (2, 3, 6, 7)
    assert second.target_generation == snap.generation + 1
    # the same incidents as the active plan: nothing new to do
    again = plan(snap, [inc("a", ("node-1",))], Policy(), NOW + 2, active_plan=first)
    assert isinstance(again, NoPlan) and "covered" in again.reasons[-1]
    # a new incident that needs nothing: the active plan continues
    idle = plan(snap, [inc("a", ("node-1",)), inc("c", ("spare-1",))], Policy(), NOW + 2, active_plan=first)
    assert isinstance(idle, NoPlan) and idle.inert == ("c",)


def test_recovering_ranks_get_sources_not_replacements():
    # ranks 2,3 moved to spare-0 by a superseded plan and are not restored yet
    snap = with_rank_state(grid(spares=2), RankState.RECOVERING, {2, 3}, node="spare-0")
    p = plan(snap, [inc("b", ("node-3",))], Policy(), NOW)
    assert p.restart_ranks == (2, 3, 6, 7)
    assert {r.rank for r in p.replacements} == {6, 7}
    assert {t.dst for t in p.transfers} == {2, 3, 6, 7}
    assert {r.to_node for r in p.replacements} == {"spare-1"}
    check_sources(snap, p)


def test_recovering_ranks_move_again_when_their_standby_fails():
    snap = with_rank_state(grid(spares=2), RankState.RECOVERING, {2, 3}, node="spare-0")
    p = plan(snap, [inc("b", ("spare-0",))], Policy(), NOW)
    assert p.restart_ranks == (2, 3)
    assert {(r.rank, r.from_node, r.to_node) for r in p.replacements} == {
        (2, "spare-0", "spare-1"),
        (3, "spare-0", "spare-1"),
    }


# ------------------------------------------------------------------ ids and determinism


def test_plan_id_deterministic():
    a = plan_id_for(JOB, ["b", "a"], 4)
    assert a == plan_id_for(JOB, ["a", "b", "a"], 4)
    assert a != plan_id_for(JOB, ["a", "b"], 5) != plan_id_for(JOB, ["a", "b"], 4, Fallback.WAIT)
    snap = grid(spares=2)
    incs = [inc("b", ("node-3",)), inc("a", ("node-1",))]
    p1 = plan(snap, incs, Policy(), NOW)
    p2 = plan(grid(spares=2), list(reversed(incs)), Policy(), NOW)
    assert p1 == p2 and p1.plan_id == plan_id_for(JOB, ["a", "b"], 4)


def test_plan_input_cache_and_arrays():
    snap = grid(nodes=4, rpn=2, tp=2)
    a = PlanInput.from_snapshot(snap)
    assert PlanInput.from_snapshot(snap) is a
    assert a.positions([0, 7, 99]).tolist() == [0, 7, -1]
    assert a.shard_members(1).tolist() == [1, 3, 5, 7]
    assert a.ranks_on(a.node_index["node-2"]).tolist() == [4, 5]
    # plan accepts the prepared arrays directly (the fast path)
    assert plan(a, [inc("a", ("node-1",))], Policy(), NOW) == plan(snap, [inc("a", ("node-1",))], Policy(), NOW)


def test_plan_input_from_registry_rows_matches_snapshot():
    snap = with_rank_state(
        with_nodes(grid(spares=2, labels={"spare-1": {"rack": "r1"}}), **{"spare-0": {"role": NodeRole.QUARANTINED}}),
        RankState.RECOVERING,
        {2},
        node="spare-1",
    )
    meta = {b"generation": b"3", b"committed_step": b"41", b"world_size": b"8", b"dp": b"4", b"tp": b"2", b"pp": b"1"}
    rows = PlanInput.from_rows(
        JOB,
        meta,
        [r.model_dump_json().encode() for r in reversed(snap.ranks)],
        [n.model_dump_json() for n in snap.nodes],
    )
    built = PlanInput.build(snap)
    for f in (
        "rank",
        "node_of",
        "shard",
        "dp_of",
        "tp_of",
        "pp_of",
        "local_rank",
        "recovering",
        "node_role",
        "node_slots",
        "shard_order",
        "node_order",
        "node_start",
    ):
        assert np.array_equal(getattr(rows, f), getattr(built, f)), f
    assert (rows.node_ids, rows.node_labels, rows.generation, rows.committed_step) == (
        built.node_ids,
        built.node_labels,
        3,
        41,
    )
    incs = [inc("a", ("node-3",))]
    assert plan(rows, incs, Policy(), NOW) == plan(snap, incs, Policy(), NOW)


def test_large_job_plan_is_compact():
    snap = grid(nodes=1250, rpn=8, tp=4, pp=2, spares=4)  # 10k ranks
    p = plan(snap, [inc("a", ("node-17",))], Policy(), NOW)
    assert len(p.restart_ranks) == 8 and len(p.transfers) == 8
    assert len(p.rebuild_groups) <= 1 + 8 * 3
    assert np.all(np.diff(p.restart_ranks) > 0)
    check_sources(snap, p)


def test_node_record_helper_untouched():
    # NodeRecord defaults used by the tests above
    assert NodeRecord(node_id="x", role=NodeRole.SPARE).standby_slots == 0


def test_second_crash_on_the_same_node_supersedes_with_both_ranks():
    # Issue #12 item 7: the detector's incident for a second dead rank of a reported node.
    snap = grid(spares=1)
    first = plan(snap, [inc("a", ("node-1",), RESTART, (2,))], Policy(), NOW)
    second = plan(
        snap,
        [inc("a", ("node-1",), RESTART, (2,)), inc("b", ("node-1",), RESTART, (3,))],
        Policy(),
        NOW + 1,
        active_plan=first,
    )
    assert second.supersedes == first.plan_id and second.restart_ranks == (2, 3)
    assert {r.rank: r.to_node for r in second.replacements} == {2: "spare-0", 3: "spare-0"}
    check_sources(snap, second)


def test_a_rank_moved_by_a_superseded_plan_keeps_its_standby():
    """A crash of rank 2 (node-1) moved it to spare-0; a second crash (rank 5, node-2) supersedes
    that plan before rank 2 was restored. Rank 2 keeps its standby on spare-0 (restored, not
    restarted again) and rank 5 takes spare-0's other slot: no cold start in place."""
    snap = with_rank_state(grid(spares=1), RankState.RECOVERING, {2}, node="spare-0")
    p = plan(
        snap,
        [inc("a", ("node-1",), RESTART, ranks=(2,)), inc("b", ("node-2",), RESTART, ranks=(5,))],
        Policy(restart_in_place_for_software=False),
        NOW,
    )
    assert p.restart_ranks == (2, 5)
    assert {(r.rank, r.to_node, r.mode) for r in p.replacements} == {(5, "spare-0", "standby")}
    assert {t.dst for t in p.transfers} == {2, 5}
    check_sources(snap, p)


def test_a_rank_restarted_in_place_by_a_superseded_plan_keeps_its_standby():
    """The in-place twin of the test above (the default policy): the first plan restarted rank 2
    on node-1 from node-1's warm standby; a crash of rank 5 supersedes it before rank 2 was
    restored. Rank 2 is restored again, its process kept (killing it left a cold start), unless
    a new incident names it again (then its replacement died: restarted)."""
    first = plan(grid(), [inc("a", ("node-1",), RESTART, ranks=(2,))], Policy(), NOW)
    assert isinstance(first, RecoveryPlan)
    assert [(r.rank, r.to_node, r.mode) for r in first.replacements] == [(2, "node-1", "in_place")]
    snap = with_rank_state(grid(), RankState.RECOVERING, {2})
    a, b = inc("a", ("node-1",), RESTART, ranks=(2,)), inc("b", ("node-2",), RESTART, ranks=(5,))
    p = plan(snap, [a, b], Policy(), NOW + 1, active_plan=first)
    assert p.restart_ranks == (2, 5)
    assert {(r.rank, r.to_node, r.mode) for r in p.replacements} == {(5, "node-2", "in_place")}
    assert {t.dst for t in p.transfers} == {2, 5}
    check_sources(snap, p)
    c = inc("c", ("node-1",), RESTART, ranks=(2,))  # (a 2nd fault of node-1: no quarantine here)
    again = plan(snap, [a, c], Policy(quarantine_faults=3), NOW + 1, active_plan=first)
    assert {(r.rank, r.to_node, r.mode) for r in again.replacements} == {(2, "node-1", "in_place")}


@pytest.mark.parametrize(
    "record, replan",
    [
        ({}, True),  # new
        ({"phase": "planned"}, True),  # its plan never got out: same plan again
        ({"phase": "planned", "plan_id": "plan-1"}, False),
        ({"phase": "recovering", "plan_id": "plan-1"}, False),
        ({"phase": "done", "plan_id": "plan-1"}, False),
        ({"phase": "failed"}, False),
        ({"phase": "superseded"}, False),
        ({"phase": "escalated"}, False),
    ],
)
def test_a_known_incident_is_planned_again_only_when_its_plan_never_got_out(record, replan) -> None:
    from flashrecovery.planner.core import known_incident_refusal

    assert (known_incident_refusal(record) is None) is replan
