"""Rendering of bench results: tables, per-phase medians, scale slopes; CLI wiring."""

import argparse

import pytest

from flashrecovery.bench.cli import SUITES, add_bench_parser
from flashrecovery.bench.report import recovery_phase_medians, render, scale_slopes, scale_table
from flashrecovery.bench.stats import summarize_runs

pytestmark = pytest.mark.unit


def _run(rto, det=0.5, eq=True, outcome="done"):
    return {
        "outcome": outcome,
        "detection_latency_s": det,
        "planning_s": 0.1,
        "dispatch_s": 0.0,
        "rto_s": rto,
        "steps_recomputed": 1,
        "committed_steps_lost": 0,
        "bitwise_equal_to_fault_free": eq,
        "phases_s": {
            "fence": 0.01,
            "pause": 0.2,
            "replace": 0.1,
            "rebuild": 0.3,
            "restore": 0.1,
            "resume": 0.0,
            "verify": 0.5,
        },
    }


def test_summarize_runs_counts_only_completed_runs():
    s = summarize_runs([_run(3.0), _run(5.0, eq=False), {"outcome": "error", "error": "x"}])
    assert s["runs"] == 3 and s["done"] == 2 and s["bitwise_equal"] == 1
    assert s["rto_s"]["median"] == 4.0 and s["rto_s"]["max"] == 5.0
    assert s["phases_s"]["pause"]["median"] == 0.2


def test_phase_medians_include_detection_and_planning():
    med = recovery_phase_medians(summarize_runs([_run(3.0)]))
    assert med["detect"] == 0.5 and med["plan"] == 0.1 and med["verify"] == 0.5


def _point(ranks, rto, cmds):
    return {
        "ranks": ranks,
        "nodes": ranks // 8,
        "detection_s": 2.0,
        "planning_s": 0.1,
        "phases_s": {"fence": 0.0, "pause": 0.3, "replace": 0.1, "rebuild": 0.1},
        "recovery_after_detection_s": rto - 2.0,
        "rto_s": rto,
        "redis_commands": cmds,
        "kafka_control_messages": 10,
    }


def test_scale_table_and_flat_slope():
    pts = [_point(64, 3.0, 200), _point(1000, 3.0, 200), {"ranks": 10000, "error": "TimeoutError: x"}]
    t = scale_table(pts)
    assert "| 64 | 8 |" in t and "error: TimeoutError" in t
    sl = scale_slopes(pts)
    assert sl["rto_s_per_10x"] == pytest.approx(0.0) and sl["redis_cmds_per_10x"] == pytest.approx(0.0)


def test_render_all_sections():
    results = {
        "machine": {"cores": 2, "cpu": "x", "memory_gib": 8, "torch": "2.13", "accelerator": None},
        "runs": {"recovery": {"command": "flashrecovery bench", "started": "now", "wall_s": 1}},
        "recovery": {"n": 1, "faults": {"process-crash": {"summary": summarize_runs([_run(4.0)])}}},
        "baseline": {
            "runs": [{"ckpt_every": 10, "at_step": 15, "rto_s": 40.0, "steps_recomputed": 5, "processes_restarted": 8}]
        },
        "scale": {"points": [_point(64, 3.0, 200), _point(1000, 3.5, 210)]},
    }
    md = render(results)
    assert "## Recovery on the real job" in md and "| process-crash | 1/1 |" in md
    assert "| 10.00 |" in md  # torchrun RTO / ours
    assert "Slope per 10x ranks" in md


def test_cli_registers_bench_with_a_func():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    add_bench_parser(sub)
    args = ap.parse_args(["bench", "--smoke", "--suite", "scale,planner", "--scale-sizes", "64,1000"])
    assert callable(args.func) and args.suite == ["scale", "planner"] and args.scale_sizes == [64, 1000]
    assert set(SUITES) >= {"recovery", "baseline", "scale", "detector", "planner", "overhead", "goodput"}


def test_overhead_table_separates_the_agent_from_the_deployment():
    from flashrecovery.bench.stats import summarize

    ov = {
        "reps": 3,
        "ours_s_per_step": summarize([0.30, 0.32, 0.31]),
        "agent_only_s_per_step": summarize([0.12, 0.11, 0.13]),
        "bare_s_per_step": summarize([0.10, 0.10, 0.11]),
        "ratio": 3.1,
        "agent_only_ratio": 1.2,
        "deployment_ratio": 2.583,
    }
    md = render({"machine": {}, "runs": {}, "overhead": ov})
    assert "agent only (torchrun, no sidecar, no services)" in md
    assert "agent only / bare: 1.2" in md and "ours / agent only" in md


def test_repeated_scale_runs_give_one_median_row_per_size():
    from flashrecovery.bench.scale import median_point

    runs = [
        {
            "ranks": 64,
            "nodes": 8,
            "detector_instances": 1,
            "outcome": "done",
            "rto_s": r,
            "detection_s": 2.3,
            "recovery_after_detection_s": r - 2.3,
            "redis_commands": c,
            "kafka_control_messages": 20,
            "phases_s": {"fence": 0.01, "pause": p},
        }
        for r, c, p in ((2.8, 200, 0.2), (3.4, 210, 0.4), (2.9, 205, 0.3))
    ]
    runs.append({"ranks": 64, "error": "TimeoutError: no RecoveryCompleted"})
    row = median_point(runs)
    assert row["rto_s"] == 2.9 and row["rto_max_s"] == 3.4 and row["redis_commands"] == 205
    assert row["phases_s"] == {"fence": 0.01, "pause": 0.3} and row["runs"] == 3 and row["failed_runs"] == 1
    assert "| 64 | 8 |" in scale_table([row])
    assert "error" in median_point(runs[-1:])
