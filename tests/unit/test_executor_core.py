from flashrecovery.executor.core import (
    applied_topology,
    cannot_proceed,
    fence_refusal,
    in_band_outcome,
    judge,
    next_phase_name,
    select_plan,
    settled,
    touched_nodes,
    waitlist,
)
from flashrecovery.shared.schemas import (
    CommandAck,
    CommandAction,
    Fallback,
    NodeRole,
    RankState,
    RecoveryPlan,
    Replacement,
    Transfer,
)
from flashrecovery.shared.topology import grid_topology

SNAP = grid_topology("j", nodes=4, ranks_per_node=2, tp=2, spares=1)


def _placement(snap=SNAP):
    return {r.rank: r.node_id for r in snap.ranks}


def _applied(plan, snap=SNAP, generation=1):
    """What the shell passes: only the moved ranks' and the touched nodes' records."""
    ranks = {r.rank: r for r in snap.ranks if r.rank in {rep.rank for rep in plan.replacements}}
    nodes = {n.node_id: n for n in snap.nodes if n.node_id in touched_nodes(plan)}
    return applied_topology(plan, ranks, nodes, generation)


def _plan(restart, reps, faulty, quarantine=()):
    return RecoveryPlan(
        job_id="j",
        generation=0,
        producer="t",
        plan_id="p",
        incident_ids=("i",),
        target_generation=1,
        world_size=8,
        restart_ranks=tuple(restart),
        faulty_nodes=tuple(faulty),
        replacements=tuple(reps),
        transfers=tuple(Transfer(src=(r + 2) % 8, dst=r) for r in restart),
        recovery_step=5,
        quarantine_nodes=tuple(quarantine),
    )


def _ack(node, ok=True, detail=""):
    return CommandAck(
        job_id="j",
        generation=1,
        producer="s",
        command_id="c",
        plan_id="p",
        incident_id="i",
        action=CommandAction.PAUSE,
        node_id=node,
        ok=ok,
        detail=detail,
    )


def test_phase_order():
    assert [next_phase_name(p) for p in ("fence", "pause", "replace", "rebuild", "restore", "resume", "verify")] == [
        "pause",
        "replace",
        "rebuild",
        "restore",
        "resume",
        "verify",
        "done",
    ]


def test_process_crash_waitlist_keeps_the_crashed_nodes_survivor():
    plan = _plan([2], [Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0)], ["node-1"])
    wl = waitlist(plan, _placement())
    assert wl.pause == {"node-0", "node-1", "node-2", "node-3"}  # rank 3 still lives on node-1
    assert wl.replace == {"spare-0"}
    assert wl.recover == {"node-0", "node-1", "node-2", "node-3", "spare-0"}


def test_only_nodes_that_lost_a_rank_report_an_in_band_pause():
    plan = _plan([2], [Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0)], ["node-1"])
    wl = waitlist(plan, _placement())
    assert wl.pause_reporters == {"node-1"}  # its survivor, rank 3, and the crashed rank's last report
    assert wl.pause_reporters & wl.pause == {"node-1"}
    reps = [Replacement(rank=r, from_node="node-1", to_node="spare-0", local_rank=r - 2) for r in (2, 3)]
    lost = waitlist(_plan([2, 3], reps, ["node-1"]), _placement())
    assert lost.pause_reporters & lost.pause == set()  # a lost node: nobody is waited for


def test_the_in_band_outcome_is_read_once_and_disagreement_is_refused():
    got = in_band_outcome([(None, 13, 13), (None, 13, 13), (None, None, None)])
    assert (got.commit_step, got.resume_step, got.computed_step) == (None, 13, 13)
    assert "different" in in_band_outcome([(12, 13, 12), (None, 13, 12)])
    assert "no rank" in in_band_outcome([(None, None, None)])


def test_node_loss_waitlist_never_waits_for_the_lost_node():
    reps = [Replacement(rank=r, from_node="node-1", to_node="spare-0", local_rank=r - 2) for r in (2, 3)]
    wl = waitlist(_plan([2, 3], reps, ["node-1"]), _placement())
    assert "node-1" not in wl.pause and "node-1" not in wl.recover


def test_judge_table():
    exp = frozenset({"a", "b"})
    assert judge({"a": _ack("a"), "b": _ack("b")}, exp, 0, 1, 10, 0, 2).outcome == "advance"
    assert judge({"a": _ack("a")}, exp, 0, 1, 10, 0, 2).outcome == "wait"
    assert judge({"a": _ack("a")}, exp, 0, 11, 10, 0, 2).outcome == "retry"
    assert judge({"a": _ack("a")}, exp, 0, 11, 10, 2, 2).outcome == "fail"
    v = judge({"a": _ack("a", ok=False, detail="no report"), "b": _ack("b")}, exp, 0, 1, 10, 2, 2)
    assert v.outcome == "fail" and "no report" in v.reason
    # acks from nodes nobody waits for change nothing
    assert judge({"a": _ack("a"), "b": _ack("b"), "z": _ack("z", ok=False)}, exp, 0, 1, 10, 0, 2).outcome == "advance"


def test_applied_topology_touches_only_moved_ranks_and_their_nodes():
    reps = [Replacement(rank=r, from_node="node-1", to_node="spare-0", local_rank=r - 2) for r in (2, 3)]
    ranks, nodes = _applied(_plan([2, 3], reps, ["node-1"]))
    assert sorted(r.rank for r in ranks) == [2, 3] and all(r.node_id == "spare-0" for r in ranks)
    by = {n.node_id: n for n in nodes}
    assert set(by) == {"node-1", "spare-0"}
    assert by["node-1"].role == NodeRole.QUARANTINED and by["node-1"].ranks == ()
    assert by["spare-0"].ranks == (2, 3) and by["spare-0"].role == NodeRole.ACTIVE


def test_partial_use_of_a_spare_keeps_it_spare():
    plan = _plan([2], [Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0)], ["node-1"])
    _, nodes = _applied(plan)
    by = {n.node_id: n for n in nodes}
    assert by["node-1"].role == NodeRole.ACTIVE and by["node-1"].ranks == (3,)
    assert by["spare-0"].role == NodeRole.SPARE and by["spare-0"].standby_slots == 1


def test_a_rank_left_recovering_is_restored_in_place_not_killed():
    from flashrecovery.executor.core import ranks_to_kill

    snap = SNAP.model_copy(
        update={"ranks": tuple(r.model_copy(update={"node_id": "spare-0"}) if r.rank == 2 else r for r in SNAP.ranks)}
    )
    plan = _plan([2, 5], [Replacement(rank=5, from_node="node-2", to_node="spare-0", local_rank=1)], ["node-2"])
    assert ranks_to_kill(plan) == (5,)
    wl = waitlist(plan, _placement(snap))
    assert "spare-0" in wl.recover and "node-2" in wl.recover  # rank 4 survives on node-2


def test_a_wait_plan_stops_after_pause_and_others_proceed():
    plan = _plan([6], [], ["node-3"])
    assert cannot_proceed(plan) is None
    held = plan.model_copy(update={"fallback": Fallback.WAIT})
    assert "waiting for capacity" in cannot_proceed(held)


def test_a_done_plan_settles_its_recovering_ranks_only():
    plan = _plan([2], [Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0)], ["node-1"])
    moved, _ = _applied(plan)
    assert [r.state for r in moved] == [RankState.RECOVERING]
    untouched = SNAP.ranks[3]
    out = settled(moved + [untouched])
    assert [(r.rank, r.state, r.node_id) for r in out] == [(2, RankState.RUNNING, "spare-0")]


def test_only_the_restart_set_and_transfer_ends_report_every_recover_stage():
    # rank 2 dies with node-1's process and moves to the spare; its state comes from rank 4
    # (node-2). Everyone verifies; only spare-0 and node-2 report rebuilt/restored/resumed.
    plan = _plan([2], [Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0)], ["node-1"])
    wl = waitlist(plan, _placement())
    assert wl.stages == {"spare-0", "node-2"}
    assert wl.stages < wl.recover


def test_stage_reporters_fall_back_to_every_node_when_none_is_named():
    held = _plan([], [], ["node-3"])
    wl = waitlist(held, _placement())
    assert wl.stages == wl.recover


def test_a_failure_from_a_node_not_waited_for_still_fails_the_stage():
    reporters = frozenset({"a"})
    everyone = frozenset({"a", "b"})
    acks = {"a": _ack("a"), "b": _ack("b", ok=False, detail="ranks did not reach rebuilt")}
    v = judge(acks, reporters, 0, 1, 10, 0, 0, fail_from=everyone)
    assert v.outcome == "fail" and "did not reach rebuilt" in v.reason
    assert judge({"a": _ack("a")}, reporters, 0, 1, 10, 0, 0, fail_from=everyone).outcome == "advance"


def _p(pid, target, incidents, supersedes=None, at=0.0):
    return RecoveryPlan(
        job_id="j",
        generation=target - 1,
        producer="t",
        plan_id=pid,
        incident_ids=tuple(incidents),
        supersedes=supersedes,
        target_generation=target,
        world_size=8,
        restart_ranks=(2,),
        faulty_nodes=(),
        replacements=(),
        transfers=(),
        recovery_step=5,
        emitted_at=at,
    )


def test_an_older_plan_never_runs_after_a_newer_one_finished():
    # Two ranks on two nodes killed at once: plan A (one incident) and plan B (both), both made
    # from generation 0. B ran and finished (registry at 1); A never started.
    a, b = _p("A", 1, ["i1"], at=1.0), _p("B", 1, ["i1", "i2"], at=2.0)
    choice = select_plan([a, b], {"B": {"phase": "done", "generation": "1"}}, 1)
    assert choice.drive is None
    assert [(p.plan_id, outcome) for p, outcome, _ in choice.retire] == [("A", "superseded")]


def test_of_two_plans_from_one_generation_only_the_newest_runs():
    a, b = _p("A", 1, ["i1"], at=1.0), _p("B", 1, ["i1", "i2"], at=2.0)
    choice = select_plan([a, b], {}, 0)
    assert choice.drive is b
    assert [(p.plan_id, o) for p, o, _ in choice.retire] == [("A", "superseded")]
    assert "superseded by B" in choice.retire[0][2]


def test_a_superseded_plan_is_retired_and_its_successor_runs():
    a, b = _p("A", 1, ["i1"]), _p("B", 2, ["i1", "i2"], supersedes="A")
    choice = select_plan([a, b], {"A": {"phase": "replace", "generation": "1"}}, 1)
    assert choice.drive is b and [(p.plan_id, o) for p, o, _ in choice.retire] == [("A", "superseded")]


def test_a_stale_plan_nobody_covers_fails_loudly():
    a = _p("A", 1, ["i1"])
    choice = select_plan([a], {}, 3)  # the registry moved on without this plan's incident
    assert choice.drive is None
    ((plan, outcome, reason),) = choice.retire
    assert outcome == "failed" and "no newer plan covers" in reason and "registry at 3" in reason


def test_a_started_plan_whose_fence_was_followed_by_a_newer_one_stops():
    a = _p("A", 1, ["i1"])
    choice = select_plan([a], {"A": {"phase": "pause", "generation": "1"}}, 2)
    assert choice.drive is None and choice.retire[0][1] == "failed"
    # still at its own generation: it continues (a takeover resumes it)
    assert select_plan([a], {"A": {"phase": "pause", "generation": "1"}}, 1).drive is a


def test_fence_refuses_a_plan_made_against_another_generation():
    b = _p("B", 2, ["i1"])
    assert fence_refusal(b, 1, None) is None
    assert "made against generation 1, registry at 2" in fence_refusal(b, 2, None)
    # B supersedes A and was made a moment before A's fence moved the generation: allowed while
    # A has written no topology (nothing in the registry that B did not see)
    c = _p("C", 2, ["i1", "i2"], supersedes="A")
    a_run = {"phase": "pause", "generation": "2", "snapshot_generation": "1"}
    assert fence_refusal(c, 2, a_run) is None
    assert fence_refusal(c, 2, {**a_run, "topology_written": "1"}) is not None
    assert fence_refusal(c, 3, a_run) is not None


def test_a_plan_carrying_a_started_plans_incidents_replaces_it_without_naming_it():
    # Two ranks on two nodes killed at once: A (one incident) started and fenced 0 -> 1; B (both
    # incidents), made from generation 0 before the planner saw A start, names nothing. B must
    # replace A (A alone cannot rebuild without B's second rank), not be refused as stale.
    a, b = _p("A", 1, ["i1"], at=1.0), _p("B", 1, ["i1", "i2"], at=2.0)
    a_run = {"phase": "pause", "generation": "1", "snapshot_generation": "0"}
    choice = select_plan([a, b], {"A": a_run}, 1)
    assert choice.drive is b
    assert [(p.plan_id, o) for p, o, _ in choice.retire] == [("A", "superseded")]
    assert "superseded by B" in choice.retire[0][2]
    # once A wrote its topology, B's snapshot is out of date: refused (it escalates loudly)
    choice = select_plan([a, b], {"A": {**a_run, "topology_written": "1"}}, 1)
    assert choice.drive is None
    # a plan for other incidents, or made against another generation, replaces nothing
    c = _p("C", 1, ["i2"], at=3.0)
    assert select_plan([a, c], {"A": a_run}, 1).drive is a


def test_a_waiting_phase_sends_its_command_again_at_the_resend_interval():
    from flashrecovery.executor.core import PhaseVerdict, resend_due

    waiting = PhaseVerdict("wait", "waiting for 2 nodes")
    assert not resend_due(waiting, last_sent_at=10.0, now=11.9, resend_s=2.0)
    assert resend_due(waiting, last_sent_at=10.0, now=12.0, resend_s=2.0)
    assert not resend_due(waiting, last_sent_at=10.0, now=99.0, resend_s=0.0)  # 0: off
    for outcome in ("advance", "retry", "fail"):  # decided: nothing left to send again
        assert not resend_due(PhaseVerdict(outcome, ""), last_sent_at=10.0, now=99.0, resend_s=2.0)
