"""End-to-end recovery of the reference job: 8 ranks (4 nodes x 2, dp 4 x tp 2) + 2 standbys.

Each test injects faults into generation-0 ranks, lets agent/testing_driver.py (sidecar +
executor stand-in) recover in-process, and checks:
- training finishes all steps; every rank's final params + optimizer state are bitwise equal to
  a fault-free run of the same job (run once per session);
- surviving ranks keep their PIDs; failed ranks are served by standbys;
- no committed step is lost; the replaced rank's digest matched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from flashrecovery.agent.testing_driver import LocalCluster, RunResult

pytestmark = pytest.mark.e2e

STEPS = 30
AT = 12
RUN_TIMEOUT_S = 420.0  # 10 torch processes on 2 shared cores: imports alone can take a minute
TEST_TIMEOUT_S = 900  # includes the session's fault-free reference run for the first test


def _flat(obj: Any, pre: str = "") -> Iterator[tuple[str, torch.Tensor | Any]]:
    if isinstance(obj, torch.Tensor):
        yield pre, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _flat(obj[k], f"{pre}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{pre}/{i}")
    else:
        yield pre, obj


def load_dumps(out_dir: str, world: int) -> dict[int, dict[str, Any]]:
    return {r: torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)}


# FLASHRECOVERY_E2E_DEVICE=cuda runs the same tests with the model on a (shared) GPU.
TRAIN_ARGS = ("--device", os.environ.get("FLASHRECOVERY_E2E_DEVICE", "cpu"))


def _run(tmp: str, fault: str | None, standbys: int) -> RunResult:
    cluster = LocalCluster(steps=STEPS, fault=fault, standbys=standbys, workdir=tmp,
                           train_args=TRAIN_ARGS,
                           hang_timeout_s=6.0, pause_timeout_s=5.0, verbose=True)
    try:
        cluster.start()
        return cluster.run(timeout_s=RUN_TIMEOUT_S)
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("agent-reference"))
    res = _run(tmp, fault=None, standbys=0)
    assert not res.recoveries
    return load_dumps(res.out_dir, 8)


def check(res: RunResult, reference: dict[int, dict[str, Any]], failed: set[int],
          recoveries: int = 1) -> None:
    real = [r for r in res.recoveries if r.failed]
    assert len(real) == recoveries, [r.summary() for r in res.recoveries]
    assert {x for r in real for x in r.failed} == failed
    for rec in res.recoveries:
        assert rec.lost_steps == 0, rec.summary()
        assert all(rec.digest_ok.values()), rec.summary()
        assert set(rec.digest_ok) == set(rec.failed), rec.summary()
        assert rec.t_first_commit is not None, rec.summary()
    for r in range(8):
        if r in failed:
            assert res.final_pids[r] != res.start_pids[r]
        else:
            assert res.final_pids[r] == res.start_pids[r], f"survivor rank {r} changed PID"
        assert res.done[r].step == STEPS
    dumps = load_dumps(res.out_dir, 8)
    for r, got in dumps.items():
        assert got["pid"] == res.final_pids[r]
        assert got["step"] == STEPS
        want = dict(_flat({"model": reference[r]["model"], "opt": reference[r]["optimizer"]}))
        have = dict(_flat({"model": got["model"], "opt": got["optimizer"]}))
        assert want.keys() == have.keys()
        diff = [k for k in want if (torch.is_tensor(want[k]) and not torch.equal(want[k], have[k]))
                or (not torch.is_tensor(want[k]) and want[k] != have[k])]
        assert not diff, f"rank {r} differs from the fault-free run in {diff[:5]}"
        assert got["digest"] == reference[r]["digest"]


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_kill_one_rank_in_gradient_sync(tmp_path: Any, reference: Any) -> None:
    res = _run(str(tmp_path), f"kind=kill,rank=2,step={AT},phase=grad_sync", standbys=2)
    check(res, reference, {2})
    d = res.recoveries[0].decision
    assert d is not None and (d.commit_step, d.resume_step) == (None, AT)


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("first,second", [("forward", "after_sync"), ("optimizer", "vote")])
def test_kill_at_each_phase(tmp_path: Any, reference: Any, first: str, second: str) -> None:
    """Two faults per run (two standbys): each phase is killed once across the two runs."""
    fault = f"kind=kill,rank=5,step=8,phase={first};kind=kill,rank=3,step=18,phase={second}"
    res = _run(str(tmp_path), fault, standbys=2)
    check(res, reference, {5, 3}, recoveries=2)
    expected = {"forward": {8}, "after_sync": {18}, "grad_sync": {18},
                "optimizer": {9},  # the victim completed vote 8: step 8 is committed
                "vote": {18, 19}}  # the vote was in flight: either outcome is exactly-once
    r1, r2 = (r for r in res.recoveries if r.failed)
    assert r1.decision is not None and r1.decision.resume_step in expected[first]
    assert r2.decision is not None and r2.decision.resume_step in expected[second]


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_kill_both_ranks_of_a_node(tmp_path: Any, reference: Any) -> None:
    fault = f"kind=kill,rank=2,step={AT},phase=forward;kind=kill,rank=3,step={AT},phase=forward"
    res = _run(str(tmp_path), fault, standbys=2)
    check(res, reference, {2, 3})
    assert sorted(res.recoveries[0].transfers, key=lambda t: t[1]) == [(0, 2), (1, 3)]


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_hang_sigstop_detected_and_killed(tmp_path: Any, reference: Any) -> None:
    res = _run(str(tmp_path), f"kind=hang,rank=4,step={AT},phase=after_sync", standbys=2)
    check(res, reference, {4})


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_ecc_error_then_python_exception(tmp_path: Any, reference: Any) -> None:
    fault = "kind=ecc,rank=7,step=8,phase=forward;kind=exception,rank=0,step=18,phase=after_sync"
    res = _run(str(tmp_path), fault, standbys=2)
    check(res, reference, {7, 0}, recoveries=2)
