"""The cluster-scale goodput model (bench/goodput_model.py, issue #14 item 5): its arithmetic on
hand-computed cases, and that it still reads the committed measurements it is built on."""

from pathlib import Path

import pytest

from flashrecovery.bench import goodput_model as G

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def _system(**kw) -> G.System:
    base = dict(
        name="s",
        detect_s={"software": 1.0, "hardware": 3.0},
        recover_s={"software": 2.0, "hardware": 2.0},
        growth_s=lambda n: 0.0,
        lost_steps=1.0,
    )
    return G.System(**{**base, **kw})


def test_without_faults_goodput_is_the_overhead_and_the_checkpoint_share():
    none = G.FailureRate(0.0, 0.5, "none")
    assert G.goodput(_system(), none, 1000, 1.0) == 1.0
    assert G.goodput(_system(overhead=1.25), none, 1000, 1.0) == pytest.approx(0.8)
    # a 10 s save every 90 steps of 1 s: 90 of every 100 s train
    assert G.goodput(_system(ckpt_every=90, ckpt_save_s=10.0), none, 1000, 1.0) == pytest.approx(0.9)


def test_a_hand_computed_case():
    # 3,600 GPUs at 1e-3 faults per GPU-hour: 1 fault per 1,000 s; half of them hardware.
    rate = G.FailureRate(1e-3, 0.5, "test")
    s = _system(ckpt_every=20, growth_s=lambda n: 0.5)
    # software: 1 + 2 + 0.5 + 1 step + 20/2 steps = 14.5 s; hardware: 3 + 2 + 0.5 + 1 + 10 = 16.5 s
    assert G.fault_cost_s(s, "software", 3600, 1.0) == pytest.approx(14.5)
    assert G.fault_cost_s(s, "hardware", 3600, 1.0) == pytest.approx(16.5)
    assert G.goodput(s, rate, 3600, 1.0) == pytest.approx(1 / (1 + 15.5 / 1000))


def test_more_gpus_more_faults_less_goodput():
    s = _system()
    values = [G.goodput(s, G.LLAMA3, n, 1.0) for n in (1_000, 10_000, 100_000)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


def test_llama3_rate_is_the_published_one_at_its_own_size():
    assert G.LLAMA3.per_second(16_384) * 86400 * 54 == pytest.approx(419)


def test_log_interpolation_hits_the_points_and_is_flat_beyond():
    f = G.log_interpolate([(10, 1.0), (1000, 3.0)])
    assert f(10) == 1.0 and f(1000) == 3.0 and f(100) == pytest.approx(2.0)
    assert f(1) == 1.0 and f(10**6) == 3.0


def test_the_model_reads_the_committed_measurements():
    m = G.measured_inputs(RESULTS)
    assert 0 < m["ours_software_detect_s"] < m["ours_hang_detect_s"]
    assert m["torchrun_restart_s"] > m["ours_software_recover_s"] > 0
    assert [r for r, _ in m["ours_scale_after_detection_s"]] == sorted(r for r, _ in m["ours_scale_after_detection_s"])
    rows = G.table(G.systems(m, 100, 5.0, 600.0), G.LLAMA3, [16384], 1.0)
    assert all(0 < v["goodput"] <= 1 for k, v in rows[0].items() if isinstance(v, dict))
