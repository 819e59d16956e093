import pytest

from flashrecovery.shared.schemas import CommandAction, ExecutorCommand, RankState
from flashrecovery.sidecar.core import (
    CommandGate,
    TokenBucket,
    prefilter,
    ranks_to_kill,
    reports_stages,
    stage_failure,
    stage_reached,
    standby_local_ranks,
    standbys_to_start,
    standbys_wanted,
)


def _cmd(cid="c1", gen=2, nodes=None):
    return ExecutorCommand(
        job_id="j",
        generation=gen,
        producer="executor-0",
        command_id=cid,
        plan_id="p",
        incident_id="i",
        action=CommandAction.PAUSE,
        nodes=nodes,
    )


def test_gate_acts_once_replays_duplicates_and_ignores_old_generations():
    gate = CommandGate("node-1", generation=2)
    assert gate.decide(_cmd())[0] == "act"
    gate.handled["c1"] = []
    assert gate.decide(_cmd()) == ("replay", "duplicate delivery: resend the acks already sent")
    verdict, reason = gate.decide(_cmd("c2", gen=1))
    assert verdict == "ignore" and "stale generation 1 < 2" in reason
    assert gate.decide(_cmd("c3", nodes=("node-7",)))[0] == "ignore"
    assert gate.decide(_cmd("c4", nodes=("node-1",)))[0] == "act"


@pytest.mark.parametrize(
    "line, hit",
    [
        ("[E ProcessGroupGloo.cpp] tp allreduce failed: Connection closed by peer", True),
        ("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", True),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("Traceback (most recent call last):", True),
        ("step 12 loss 3.2145", False),
        ("starting epoch 3", False),
    ],
)
def test_prefilter(line, hit):
    assert (prefilter(line) is not None) == hit


def test_token_bucket_limits_a_log_storm_and_refills():
    b = TokenBucket(rate=10, burst=5)
    assert sum(b.allow(0.0) for _ in range(100)) == 5
    assert b.dropped == 95
    assert sum(b.allow(1.0) for _ in range(100)) == 5  # refilled to the burst, not beyond
    assert b.allow(1.05) is False and b.allow(1.2) is True


def test_stage_reached_needs_every_local_rank():
    assert not stage_reached("rebuilt", [2, 3], {2: {"rebuilt"}, 3: set()})
    assert stage_reached("rebuilt", [2, 3], {2: {"rebuilt"}, 3: {"rebuilt", "restored"}})
    assert not stage_reached("rebuilt", [], {})


def test_only_named_nodes_report_recover_stages():
    recover = _cmd().model_copy(update={"action": CommandAction.RECOVER, "stage_nodes": ("spare-0", "node-2")})
    assert reports_stages(recover, "spare-0") and reports_stages(recover, "node-2")
    assert not reports_stages(recover, "node-1")
    # a command from an executor that predates the field: every node reports every stage
    assert reports_stages(_cmd().model_copy(update={"action": CommandAction.RECOVER}), "node-1")


def _tok(cid, token, gen=2):
    return _cmd(cid, gen=gen).model_copy(update={"fence_token": token})


def test_gate_refuses_commands_of_a_deposed_executor_and_counts_them():
    gate = CommandGate("node-1", generation=2)
    assert gate.decide(_tok("a", 3))[0] == "act"
    gate.handled["a"] = []
    verdict, reason = gate.decide(_tok("b", 2))  # the old leader, awake again
    assert verdict == "ignore" and "stale fence token 2 < 3" in reason
    assert gate.refused_tokens == 1
    # even a re-send of a command already handled: the deposed leader gets no replay either
    assert gate.decide(_tok("a", 2))[0] == "ignore" and gate.refused_tokens == 2
    assert gate.decide(_tok("a", 3))[0] == "replay"  # the new leader re-sending after takeover
    assert gate.decide(_tok("c", 4))[0] == "act" and gate.fence_token == 4
    assert gate.decide(_tok("d", None))[0] == "act"  # a command from something without a lease


def test_a_retry_never_kills_the_replacement_it_assigned():
    # rank 2 was replaced in generation 3 by attempt 0 of the REPLACE; attempt 1 (same
    # generation, new command id) names rank 2 again in kill_ranks.
    workers = [(2, 3), (3, None)]
    assert ranks_to_kill([2], 3, workers) == set()
    # the old process of rank 2 (started as itself) is killed
    assert ranks_to_kill([2, 3], 3, [(2, None), (3, None)]) == {2, 3}
    # a newer plan (generation 4) that moves rank 2 again does kill the generation-3 replacement
    assert ranks_to_kill([2], 4, workers) == {2}


def test_an_error_during_a_stage_fails_it_at_once():
    progress = {2: {"rebuilt"}, 3: {"rebuilt", "restored"}}
    errors = {2: "state from rank 6: digest mismatch"}
    assert stage_failure("restored", [2, 3], progress, errors) == "rank 2: state from rank 6: digest mismatch"
    assert stage_failure("rebuilt", [2, 3], progress, errors) is None  # it got past this one
    assert stage_failure("restored", [2, 3], progress, {}) is None  # still waiting, nothing failed


def test_a_rank_lost_since_the_fence_fails_the_recover_at_once():
    """A second crash between this plan's fence and its RECOVER (seen after a broker restart
    delayed the pause): the node's rebuild could only wait for the dead rank until the phase
    timeout. Victims of this plan (replaced) and of older plans do not count."""
    from flashrecovery.sidecar.core import WorkerFate, lost_before_recover

    gen = 2
    workers = [
        WorkerFate(4, alive=True, unexpected_exit=False, exited_in_generation=None),
        WorkerFate(5, alive=False, unexpected_exit=True, exited_in_generation=2),  # died inside the recovery
        WorkerFate(2, alive=False, unexpected_exit=True, exited_in_generation=1),  # this plan's victim
        WorkerFate(3, alive=False, unexpected_exit=True, exited_in_generation=0),  # an older plan's victim
        WorkerFate(6, alive=False, unexpected_exit=False, exited_in_generation=2),  # killed by order
        WorkerFate(7, alive=False, unexpected_exit=True, exited_in_generation=1),  # died before this node's pause
        WorkerFate(None, alive=False, unexpected_exit=True, exited_in_generation=2),  # a standby
    ]
    assert lost_before_recover(gen, replaced=[2], workers=workers) == [5, 7]
    # a rank whose replacement already runs here is not lost
    workers.append(WorkerFate(5, alive=True, unexpected_exit=False, exited_in_generation=None))
    assert lost_before_recover(gen, replaced=[2], workers=workers) == [7]
    assert lost_before_recover(gen, replaced=[2, 7], workers=workers) == []


# ---------------------------------------------------------------- warm standbys (issue #14 item 1)
RUN, REC, PAUSED, START = RankState.RUNNING, RankState.RECOVERING, RankState.PAUSED, RankState.STARTING


def test_an_active_node_keeps_its_standbys_whatever_it_hosts_a_spare_its_free_slots():
    assert standbys_wanted("active", capacity=2, hosted=2, per_node=1) == 1
    assert standbys_wanted("active", capacity=2, hosted=2, per_node=0) == 0
    assert standbys_wanted("spare", capacity=2, hosted=0, per_node=1) == 2
    assert standbys_wanted("spare", capacity=2, hosted=1, per_node=1) == 1  # a rank moved here
    assert standbys_wanted("spare", capacity=2, hosted=3, per_node=1) == 0


def test_a_used_standby_is_replenished_once_the_node_trains_again():
    # the standby became the restarted rank: none left, and that rank is still recovering
    assert standbys_to_start(1, 0, [RUN, REC]) == 0
    assert standbys_to_start(1, 0, [RUN, PAUSED]) == 0
    assert standbys_to_start(1, 0, [START, START]) == 0  # nor while the job starts
    assert standbys_to_start(1, 0, [RUN, RUN]) == 1
    assert standbys_to_start(1, 0, [RUN, REC], waited_out=True) == 1  # bounded: a long WAIT plan
    assert standbys_to_start(1, 1, [RUN, RUN]) == 0  # never more than wanted
    assert standbys_to_start(2, 1, []) == 1  # a spare with no rank yet
    assert standbys_to_start(1, 0, [RankState.HUNG, RUN]) == 1
    assert standbys_to_start(1, 0, [RankState.DONE, RUN], waited_out=True) == 0  # the job is ending


def test_a_standby_never_shares_a_local_rank_with_a_rank_or_another_standby():
    # heartbeat rows are keyed by local rank: an active node's standby on its rank's local rank 0
    # hid that rank from the detector (a SIGSTOPped rank 6 went unseen, its peers were blamed)
    assert standby_local_ranks([0, 1], 1) == [2]
    assert standby_local_ranks([], 2) == [0, 1]  # a spare: its slots
    assert standby_local_ranks([1], 2) == [0, 2]  # a spare hosting a moved rank at slot 1
    assert standby_local_ranks([0, 1, 2], 1) == [3]  # ranks 0, 1 and a standby at 2


def test_an_in_band_recover_resumes_where_the_ranks_decided_and_must_not_name_steps():
    from flashrecovery.sidecar.core import RegistryView, command_refusal, decided_resume_step

    def recover(**kw):
        return _cmd().model_copy(update={"action": CommandAction.RECOVER, "world_size": 8, **kw})

    view = RegistryView(generation=2, world_size=8, fence_token=None)
    assert command_refusal(recover(in_band=True), view) is None
    assert "in-band" in command_refusal(recover(in_band=True, resume_step=12), view)
    assert "out of range" in command_refusal(recover(), view)  # the other path must name them
    progress = [("restored", None), ("rebuilt", 13), ("rebuilt", 13)]
    assert decided_resume_step(recover(in_band=True), progress) == 13
    assert decided_resume_step(recover(resume_step=7), progress) == 7
    assert decided_resume_step(recover(in_band=True), [("rebuilt", None)]) == -1


def test_a_refill_waits_until_the_recovered_ranks_committed_a_few_steps():
    """Issue #14 item 1: a refill never counts in RTO. A rank that resumed is `running`, but the
    recovery ends only at its first commit (whose collectives also connect the new groups): the
    refill starts once every rank of the node committed REFILL_AFTER_STEPS steps since its pause."""
    from flashrecovery.sidecar.core import REFILL_AFTER_STEPS, refill_state

    just_resumed = [refill_state(RankState.RUNNING, 0), refill_state(RankState.RUNNING, REFILL_AFTER_STEPS)]
    assert standbys_to_start(1, 0, just_resumed) == 0
    assert standbys_to_start(1, 0, just_resumed, waited_out=True) == 1  # the bounded wait still ends
    trained = [refill_state(RankState.RUNNING, REFILL_AFTER_STEPS)] * 2
    assert standbys_to_start(1, 0, trained) == 1
    assert refill_state(RankState.PAUSED, 100) is RankState.PAUSED
