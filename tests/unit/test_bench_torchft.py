"""The torchft column: progress logs -> RTO and step accounting, pid bookkeeping, rendering."""

import argparse

import pytest

from flashrecovery.bench.cli import SUITES, add_bench_parser
from flashrecovery.bench.report import render
from flashrecovery.bench.torchft_bench import parse_progress, pids_by_replica, summarize

pytestmark = pytest.mark.unit


def _rows(text: str):
    return parse_progress([line.split() for line in text.strip().splitlines()])


# fault at t=10.0 after step 3 was committed; group 1 is killed and restarted (attempt 1)
SURVIVOR = _rows("""
0 1 8.0 2 1
0 2 9.0 2 1
0 3 9.9 2 1
0 4 10.2 2 0
0 4 11.0 1 1
0 5 12.0 1 1
0 6 13.0 1 1
0 7 14.0 2 1
""")
VICTIM = _rows("""
0 1 8.0 2 1
0 2 9.0 2 1
0 3 9.9 2 1
1 6 13.1 1 1
1 7 14.0 2 1
""")


def test_summarize_healed_restart():
    s = summarize({0: SURVIVOR, 1: VICTIM}, fault_at=10.0, victim=1, replicas=2)
    assert s["restarted_group_rejoined"] is True
    assert s["rto_s"] == pytest.approx(3.1)
    assert s["first_step_after_restart"] == 6
    assert s["rto_survivors_s"] == pytest.approx(1.0)
    assert s["last_step_before_fault"] == 3
    assert s["steps_recomputed"] == 1  # step 4's first attempt failed to commit
    assert s["committed_steps_lost"] == 0
    # steps 4, 5 with one group, step 6 while group 1 healed (not participating)
    assert s["microbatches_dropped"] == 3 and s["steps_at_reduced_width"] == 3


def test_summarize_restart_that_came_back_too_late_is_not_a_recovery():
    late = _rows("""
0 1 8.0 2 1
0 2 9.0 2 1
0 3 9.9 2 1
1 1 20.0 1 1
""")
    s = summarize({0: SURVIVOR, 1: late}, fault_at=10.0, victim=1, replicas=2)
    assert s["restarted_group_rejoined"] is False and s["rto_s"] is None
    assert s["rto_survivors_s"] == pytest.approx(1.0)


def test_summarize_survivor_group_that_crashed_and_came_back_too_late():
    stuck = _rows("""
0 3 9.9 2 1
0 4 40.0 2 0
1 1 45.0 1 1
""")
    s = summarize({0: SURVIVOR, 1: VICTIM, 2: stuck}, fault_at=10.0, victim=1, replicas=3)
    assert s["survivor_groups_crashed"] == [2]
    assert s["rto_survivors_s"] == pytest.approx(1.0)  # the groups that kept running
    assert s["committed_steps_lost"] == 0  # its lone step 1 is not a rollback of the job


def test_commit_logged_just_after_the_fault_is_not_a_rollback():
    # group 0 wrote its step-3 line a moment after the SIGKILL (the kill follows the victim's step 3)
    late_line = _rows("""
0 2 9.0 2 1
0 3 10.01 2 1
0 4 11.0 1 1
""")
    s = summarize({0: late_line, 1: VICTIM}, fault_at=10.0, victim=1, replicas=2)
    assert s["committed_steps_lost"] == 0


def test_summarize_counts_rolled_back_steps():
    # a group that went back to step 2 after the fault redid steps 2 and 3
    back = _rows("""
0 1 8.0 2 1
0 2 9.0 2 1
0 3 9.9 2 1
0 2 12.0 1 1
0 3 13.0 1 1
""")
    s = summarize({0: back, 1: VICTIM}, fault_at=10.0, victim=1, replicas=2)
    assert s["committed_steps_lost"] == 2


def test_parse_progress_skips_short_lines_and_pids_group_by_attempt():
    assert parse_progress([["0", "1"], ["0", "1", "2.5", "4", "0"]]) == [(0, 1, 2.5, 4, False)]
    pids = pids_by_replica([["1", "0", "0", "10"], ["1", "0", "1", "11"], ["1", "1", "0", "12"], ["0", "0", "0", "9"]])
    assert pids == {1: {0: {10, 11}, 1: {12}}, 0: {0: {9}}}


def test_suite_registered_and_rendered():
    assert "torchft" in SUITES
    p = argparse.ArgumentParser()
    add_bench_parser(p.add_subparsers())
    args = p.parse_args(["bench", "--suite", "torchft", "--torchft-faults", "after-step,in-allreduce"])
    assert args.suite == ["torchft"] and args.torchft_faults == ["after-step", "in-allreduce"]
    run = {
        "replicas": 4,
        "tp": 2,
        "fault": "after-step",
        "at_step": 15,
        "restarted_group_rejoined": True,
        **summarize({0: SURVIVOR, 1: VICTIM}, 10.0, 1, 2),
        "survivors_pids_kept": True,
        "processes_restarted": 2,
        "replicas_consistent": True,
    }
    md = render(
        {
            "torchft": {
                "runs": [run, {"fault": "in-allreduce", "at_step": 15, "error": "boom"}],
                "torchft": "torchft-nightly 2026.10.26",
            }
        }
    )
    assert "## TorchFT, same job, same fault (torchft-nightly 2026.10.26)" in md
    assert "| torchft, 4 groups x tp 2 | after-step | 15 | — | 3.10 |" in md
    assert "error: boom" in md
    assert "Skipped: torchft not installed" in render({"torchft": {"skipped": "torchft not installed: pip ..."}})


def test_goodput_counts_a_torchft_step_by_the_share_of_groups_that_trained_it():
    """Issue #14 item 4: while a group is down or healing torchft commits steps at reduced
    width (its micro-batches are skipped), so a step is worth participants / replicas."""
    from flashrecovery.bench.torchft_bench import full_width_steps

    progress = {
        0: [(0, 1, 10.0, 4, True), (0, 2, 11.0, 3, True), (0, 3, 12.0, 3, False), (0, 3, 13.0, 4, True)],
        1: [(0, 1, 10.0, 4, True), (0, 2, 11.0, 3, True), (0, 3, 13.0, 4, True)],
        2: [(1, 3, 13.0, 4, True)],  # restarted, healed: the step is counted once
    }
    work, steps = full_width_steps(progress, 4, 9.0, 20.0)
    assert steps == 3 and work == 1 + 0.75 + 1
    assert full_width_steps(progress, 4, 10.0, 12.5) == (0.75, 1)  # the window is (since, until]
