"""The examples a user would write (examples/), recovering under `flashrecovery run --standalone`:
the real embedded stack, services, sidecars, standbys and torch workers.

(a) examples/ddp_mlp/train.py (torch DDP, SGD + momentum, OneCycleLR, clipping, dropout,
    step-indexed data): `flashrecovery inject process-crash --rank 1` from another terminal while
    it trains.
(b) examples/ddp_tp_mlp/train.py (dp 2 x tp 2 with ordinary dist.all_reduce on the agent's tp
    group, DDP on its dp group, AdamW + warmup/cosine LambdaLR): rank 1 SIGKILLs itself while its
    gradient all-reduce is in flight.
(b') the same script with --mesh: the tp sum by functional collectives over the agent's
    DeviceMesh; rank 1 dies as its tp collective starts, leaving rank 0 waiting in it.
Each ends with every rank's model, optimizer and scheduler state bitwise equal to a fault-free run
of the same command, 0 committed steps lost, and the survivors still in their first processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from flashrecovery.cluster import states_equal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
NPROC = 4
FIRST_PID = re.compile(r"\[rank(\d+)\].*event='initialised'.*generation=0 .*pid=(\d+)")


def _env(tmp: Path, mark: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHRECOVERY_")}
    env.update(FLASHRECOVERY_RUNTIME_DIR=str(tmp / "rt"), FR_TEST_MARK=mark, **extra)
    return env


def _run(
    tmp: Path,
    script: str,
    args: list[str],
    out: Path,
    env: dict[str, str],
    inject_rank: int | None = None,
    inject_after_step: int = 0,
    launcher: tuple[str, ...] = (),
) -> tuple[int, str]:
    """flashrecovery run --standalone ...; with inject_rank, `flashrecovery inject` from another
    process once rank 0 printed step `inject_after_step`. Returns (exit code, all output)."""
    cmd = [
        sys.executable,
        "-m",
        "flashrecovery",
        "run",
        "--standalone",
        "--nproc-per-node",
        str(NPROC),
        "--standbys",
        "1",
        "--timeout",
        "300",
        *launcher,
        str(ROOT / script),
        *args,
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        if inject_rank is not None:
            deadline = time.monotonic() + 240
            while not any(f"step {inject_after_step} loss" in ln for ln in lines):
                assert proc.poll() is None, "".join(lines)[-4000:]
                assert time.monotonic() < deadline, "never reached the step: " + "".join(lines)[-4000:]
                time.sleep(0.1)
            inj = subprocess.run(
                [sys.executable, "-m", "flashrecovery", "inject", "process-crash", "--rank", str(inject_rank)],
                env=env,
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert inj.returncode == 0, inj.stdout[-2000:] + inj.stderr[-2000:]
        code = proc.wait(360)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    return code, "".join(lines)


def _states(out: Path) -> dict[int, dict]:
    states = {}
    for r in range(NPROC):
        s = torch.load(out / f"rank{r}.pt", weights_only=False)
        states[r] = {
            "model": s["model"],
            "optimizer": s["optimizer"],
            "stateful": {"scheduler": s["scheduler"]},
            "step": s.get("step", 0),
            "pid": s["pid"],
        }
    return states


def _plans(tmp: Path) -> list[dict]:
    out = []
    for log in (tmp / "rt").rglob("executor-*.log"):
        for line in log.read_text().splitlines():
            if '"plan_finished"' in line:
                out.append(json.loads(line))
    return out


def _check(tmp: Path, script: str, args: list[str], killed: int, **run_kw: object) -> None:
    for d in ("a", "b"):
        (tmp / d).mkdir()
    mark = uuid.uuid4().hex
    launcher = run_kw.get("launcher", ())
    code, ref_log = _run(tmp, script, args, tmp / "ref", _env(tmp / "a", mark), launcher=launcher)  # type: ignore[arg-type]
    assert code == 0, ref_log[-4000:]
    fault_env = run_kw.pop("fault_env", {})
    code, log = _run(
        tmp,
        script,
        args,
        tmp / "faulted",
        _env(tmp / "b", mark, **fault_env),  # type: ignore[arg-type]
        **run_kw,
    )  # type: ignore[arg-type]
    assert code == 0, log[-6000:]
    ref, got = _states(tmp / "ref"), _states(tmp / "faulted")
    same, why = states_equal(ref, got)
    assert same, why
    plans = _plans(tmp / "b")
    done = [p for p in plans if p["outcome"] == "done"]
    assert len(done) == 1, plans
    assert done[0]["committed_steps_lost"] == 0, done[0]
    first = {int(r): int(pid) for r, pid in FIRST_PID.findall(log)}
    assert set(first) == set(range(NPROC)), log[-4000:]
    for r in range(NPROC):
        if r == killed:
            assert got[r]["pid"] != first[r]  # replaced by the standby
        else:
            assert got[r]["pid"] == first[r], f"survivor rank {r} was restarted"


def test_ddp_example_recovers_from_an_injected_crash_bitwise(tmp_path: Path) -> None:
    _check(
        tmp_path,
        "examples/ddp_mlp/train.py",
        ["--steps", "30", "--step-sleep", "0.15"],
        killed=1,
        inject_rank=1,
        inject_after_step=10,
    )


def test_ddp_tp_example_recovers_from_a_kill_in_the_gradient_allreduce_bitwise(tmp_path: Path) -> None:
    _check(
        tmp_path,
        "examples/ddp_tp_mlp/train.py",
        ["--tp", "2", "--steps", "24"],
        killed=1,
        launcher=("--tp", "2"),
        fault_env={"FLASHRECOVERY_AGENT_FAULT": "kind=kill,rank=1,step=12,phase=grad_sync"},
    )


def test_ddp_tp_example_on_a_device_mesh_recovers_from_a_kill_in_a_functional_collective(tmp_path: Path) -> None:
    # --mesh: the tp sum is torch's functional all_reduce over the agent's DeviceMesh ("tp" dim).
    # Rank 1 dies as its first tp collective of step 12 starts, so its tp peer, rank 0, is left
    # waiting in the functional all_reduce: the pause must end that wait (no hang, no exception).
    _check(
        tmp_path,
        "examples/ddp_tp_mlp/train.py",
        ["--tp", "2", "--steps", "24", "--mesh"],
        killed=1,
        launcher=("--tp", "2"),
        fault_env={"FLASHRECOVERY_AGENT_FAULT": "kind=kill,rank=1,step=12,phase=tp_collective"},
    )
