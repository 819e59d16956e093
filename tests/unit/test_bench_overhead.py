"""The overhead suite's timing window and CPU attribution, and the goodput suite's pooling of
rounds (bench/overhead.py, bench/cpu_share.py, bench/goodput.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flashrecovery.bench.cpu_share import CpuWindow
from flashrecovery.bench.goodput import pooled
from flashrecovery.bench.overhead import s_per_step, steady_window


def test_the_timed_window_leaves_out_the_start_and_the_last_step() -> None:
    assert steady_window(150) == (30, 149)
    assert steady_window(5) == (2, 4)
    # 0.5 s per step during the start, 0.1 s after: only the steady rate is reported
    rows, t = [], 0.0
    for step in range(1, 151):
        t += 0.5 if step < 30 else 0.1
        rows.append((step, t))
    got = s_per_step(rows, 150)
    assert got["s_per_step"] == pytest.approx(0.1, abs=1e-6)
    assert got["samples"] == 120


def _cores_over_one_second() -> dict[str, float]:
    w = CpuWindow()
    w.start()
    time.sleep(1.0)
    return w.end()


def test_a_busy_child_is_counted_and_the_sleeping_driver_is_not() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<20: pass"])
    try:
        cores = _cores_over_one_second()
    finally:
        busy.kill()
        busy.wait(timeout=10)
    # the busy loop is an unlabelled child ("other"); the driver itself only slept
    assert cores.get("other", 0.0) > 0.3
    assert cores.get("benchmark driver", 0.0) < 0.3


def test_a_worker_forked_by_a_zygote_counts_as_a_trainer_and_the_zygote_apart() -> None:
    """A forked worker keeps its zygote's command line; its parent tells it from the zygote."""
    code = "import os, time\nif os.fork() == 0:\n    t=time.time()\n    while time.time()-t<20: pass\nelse:\n    time.sleep(20)"
    zygote = subprocess.Popen([sys.executable, "-c", code, "flashrecovery.sidecar.zygote"], start_new_session=True)
    try:
        cores = _cores_over_one_second()
    finally:
        os.killpg(zygote.pid, signal.SIGKILL)
        zygote.wait(timeout=10)
    assert cores.get("trainers and standbys", 0.0) > 0.3, cores
    assert cores.get("zygotes", 0.0) < 0.3, cores
    assert "sidecars" not in cores, cores


def test_rounds_pool_to_medians_with_the_spread_and_every_run_kept() -> None:
    runs = [
        {"goodput": 0.9, "net_steps": 100, "steps_per_s": 1.0, "duration_s": 300.0, "faults": [{"at_s": 1}], "x": 1},
        {"goodput": 0.97, "net_steps": 120, "steps_per_s": 1.2, "duration_s": 300.1, "faults": [{"at_s": 2}]},
        {"goodput": 0.95, "net_steps": 110, "steps_per_s": 1.1, "duration_s": 300.2, "faults": []},
    ]
    p = pooled(runs)
    assert (p["goodput"], p["goodput_min"], p["goodput_max"]) == (0.95, 0.9, 0.97)
    assert (p["net_steps"], p["steps_per_s"], p["n"]) == (110, 1.1, 3)
    assert p["goodput_runs"] == [0.9, 0.97, 0.95]
    assert len(p["faults"]) == 2 and p["runs"] == runs and p["x"] == 1


def test_the_goodput_trace_compares_each_fault_with_the_runs_own_lead_in() -> None:
    from flashrecovery.bench.goodput_trace import analyse

    # 10 steps/s from t = 100 (training start), 5 steps/s for 12 s after the fault at 20 s
    samples, step = [], 0
    for k in range(40):
        t = 100.0 + 2 * k
        samples.append({"t": t, "min_step": step, "procs": {}})
        step += 10 if 120 <= t < 132 else 20
    samples[0]["min_step"] = 1
    got = analyse(samples, [20.0], width_s=6.0, windows=3)
    assert got["lead_in_steps_per_s"] == pytest.approx(10.0)
    assert got["after_faults"][0]["steps_per_s"] == [5.0, 5.0, 10.0]
    # a window past the last sample is unknown, not 0 steps/s
    assert analyse(samples, [20.0, 70.0], width_s=6.0, windows=2)["after_faults"][1]["steps_per_s"] == [10.0, None]
    assert analyse(samples, []) == {"lead_in_steps_per_s": None, "after_faults": []}


def test_the_refill_ab_counts_only_refilled_standbys_and_compares_faults_with_the_lead_in() -> None:
    from flashrecovery.bench.refill_ab import post_fault_ratio, refill_cpu_s

    def proc(cpu: float, role: str) -> dict:
        return {"cpu_s": cpu, "nice": 10, "threads": 9, "warm_start": role == "standby", "role": role}

    samples = [
        {"min_step": -1, "procs": {"1": proc(5.0, "rank 0"), "2": proc(4.0, "standby")}},  # started with the job
        {"min_step": 4, "procs": {"1": proc(7.0, "rank 0"), "2": proc(4.5, "rank 1"), "3": proc(1.5, "standby")}},
        {"min_step": 9, "procs": {"1": proc(9.0, "rank 0"), "2": proc(6.0, "rank 1"), "3": proc(6.0, "standby")}},
        {"min_step": 12, "procs": {"1": proc(11.0, "rank 0"), "2": proc(8.0, "rank 1"), "3": proc(9.0, "rank 1")}},
        # a later recovery: the step reads -1 while a rank is missing; pid 4 is the next refill
        {"min_step": -1, "procs": {"1": proc(12.0, "rank 0"), "3": proc(9.5, "rank 1"), "4": proc(0.5, "standby")}},
        {"min_step": 15, "procs": {"1": proc(13.0, "rank 0"), "3": proc(10.0, "rank 1"), "4": proc(3.0, "standby")}},
    ]
    assert refill_cpu_s(samples) == 9.0  # pids 3 and 4, while they were standbys, from their start
    summary = {
        "lead_in_steps_per_s": 10.0,
        "after_faults": [{"steps_per_s": [5.0, 9.0, None]}, {"steps_per_s": [8.0, 10.0]}, {"steps_per_s": [None]}],
    }
    assert post_fault_ratio(summary) == 0.8  # median of 0.7 and 0.9; a fault with no window is left out
    assert post_fault_ratio({"lead_in_steps_per_s": None, "after_faults": []}) is None


def test_the_trace_tells_a_nodes_zygote_from_the_workers_it_forked() -> None:
    from flashrecovery.bench.goodput_trace import role

    found = {
        10: {"forked": True, "ppid": 5},  # the zygote: its parent is the sidecar
        11: {"forked": True, "ppid": 10},  # forked by it: a standby...
        12: {"forked": True, "ppid": 10},  # ...or the rank a standby became
        13: {"forked": False, "ppid": 5},  # a worker started as a new interpreter
    }
    ranks = {12: 2}
    assert [role(pid, found[pid], ranks, found) for pid in (10, 11, 12, 13)] == [
        "zygote",
        "standby",
        "rank 2",
        "standby",
    ]


def test_torchruns_lead_in_is_its_first_attempts_rate_between_two_wall_times() -> None:
    from flashrecovery.bench.goodput import lead_in_rate

    # attempt 0 runs 10 steps/s from t=100; attempt 1 (after a restart) must not count
    rows = [["0", str(s), f"{100 + s / 10:.6f}"] for s in range(1, 201)]
    rows += [["1", str(s), f"{130 + s / 10:.6f}"] for s in range(150, 160)]
    assert lead_in_rate(rows, 105.0, 115.0) == pytest.approx(10.0)
    assert lead_in_rate(rows, 200.0, 210.0) is None  # no rows of attempt 0 there


def test_pooled_rounds_carry_the_ratio_to_each_runs_lead_in() -> None:
    runs = [
        {"goodput": 0.9, "goodput_vs_lead_in": 0.96, "net_steps": 1, "steps_per_s": 1.0, "duration_s": 1.0},
        {"goodput": 0.8, "goodput_vs_lead_in": 0.92, "net_steps": 1, "steps_per_s": 1.0, "duration_s": 1.0},
        {"goodput": 0.7, "goodput_vs_lead_in": None, "net_steps": 1, "steps_per_s": 1.0, "duration_s": 1.0},
    ]
    p = pooled(runs)
    assert (p["goodput_vs_lead_in_min"], p["goodput_vs_lead_in_max"]) == (0.92, 0.96)
    assert p["goodput_vs_lead_in"] == pytest.approx(0.94)
    assert p["goodput_vs_lead_in_runs"] == [0.96, 0.92, None]


def test_a_faulty_run_is_scored_by_its_fault_free_twins_rate_over_the_same_length() -> None:
    from flashrecovery.bench.goodput import against_fault_free

    faulty = {"goodput": 0.99, "net_steps": 2700, "duration_s": 300.0, "faults": [{"at_s": 60}]}
    free = {"goodput": None, "net_steps": 2880, "duration_s": 300.0, "steps_per_s": 9.6, "faults": []}
    got = against_fault_free(faulty, free)
    assert got["goodput_vs_fault_free"] == pytest.approx(2700 / 2880, abs=1e-3)
    assert got["fault_free_twin"] == {"duration_s": 300.0, "net_steps": 2880, "steps_per_s": 9.6}
    assert got["goodput"] == 0.99  # the definition stays beside it
    # unequal lengths compare rates, not counts
    longer = {**free, "net_steps": 3840, "duration_s": 400.0}
    assert against_fault_free(faulty, longer)["goodput_vs_fault_free"] == pytest.approx(0.9375, abs=1e-3)


def test_torchfts_twin_compares_work_weighted_by_the_groups_that_trained_it() -> None:
    from flashrecovery.bench.goodput import against_fault_free

    # torchft counts a step trained by 3 of 4 replica groups as 0.75 (full_width_steps)
    faulty = {"net_steps": 2800, "full_width_steps": 2625.0, "duration_s": 300.0, "faults": [{"at_s": 60}]}
    free = {"net_steps": 2800, "full_width_steps": 2800.0, "duration_s": 300.0, "faults": []}
    assert against_fault_free(faulty, free)["goodput_vs_fault_free"] == pytest.approx(0.9375, abs=1e-3)


def test_a_twin_with_faults_or_no_work_is_refused() -> None:
    from flashrecovery.bench.goodput import against_fault_free

    faulty = {"net_steps": 10, "duration_s": 1.0, "faults": [{"at_s": 0.5}]}
    with pytest.raises(ValueError, match="faults injected"):
        against_fault_free(faulty, faulty)
    with pytest.raises(ValueError, match="trained nothing"):
        against_fault_free(faulty, {"net_steps": 0, "duration_s": 1.0, "faults": []})


def test_paired_rounds_pool_the_twin_ratio_with_its_spread() -> None:
    runs = [
        {"goodput": 0.9, "goodput_vs_fault_free": 0.97, "net_steps": 1, "steps_per_s": 1.0, "duration_s": 1.0},
        {"goodput": 0.8, "goodput_vs_fault_free": 0.93, "net_steps": 1, "steps_per_s": 1.0, "duration_s": 1.0},
        {"goodput": 0.7, "goodput_vs_fault_free": 0.99, "net_steps": 1, "steps_per_s": 1.0, "duration_s": 1.0},
    ]
    p = pooled(runs)
    assert (p["goodput_vs_fault_free"], p["goodput_vs_fault_free_min"], p["goodput_vs_fault_free_max"]) == (
        0.97,
        0.93,
        0.99,
    )
    assert p["goodput_vs_fault_free_runs"] == [0.97, 0.93, 0.99]
    # unpaired rounds carry no such key
    assert "goodput_vs_fault_free" not in pooled([{**r, "goodput_vs_fault_free": None} for r in runs])
