"""`flashrecovery run --standalone` with a plain torchrun script: the real embedded stack,
services, sidecar and torch workers.

1. examples/ddp_mlp/train_plain.py (DDP, gloo, AdamW, no FlashRecovery import) runs to exit 0
   and its final states equal, bitwise, those of the same command under torchrun.
2. While a plain job runs, `flashrecovery status` and `inject` from "another terminal" find it
   by themselves; the injected crash of a plain rank ends the run with exit 1 and a one-line
   reason naming the rank (nothing can recover a script without the agent).
After each run nothing the launcher started is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from flashrecovery.cluster import states_equal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PLAIN = ROOT / "examples" / "ddp_mlp" / "train_plain.py"
STEPS = 30
# A plain script that keeps its two ranks in allreduces for up to a minute.
LOOP = """
import time, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(4)
for i in range(600):
    dist.all_reduce(t)
    print(f"alive {i}", flush=True)
    time.sleep(0.1)
dist.destroy_process_group()
"""


def _env(tmp: Path, mark: str) -> dict[str, str]:
    env = {**os.environ, "FLASHRECOVERY_RUNTIME_DIR": str(tmp / "rt"), "FR_TEST_MARK": mark}
    for k in [k for k in env if k.startswith("FLASHRECOVERY_") and k != "FLASHRECOVERY_RUNTIME_DIR"]:
        del env[k]
    return env


def _ours(*argv: str) -> list[str]:
    return [sys.executable, "-m", "flashrecovery", "run", "--standalone", "--nproc-per-node", "2", *argv]


def _left_running(mark: str) -> list[str]:
    """Processes still carrying the test's marker in their environment (the launcher's
    children inherit it: stack, services, sidecars, workers)."""
    left = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"FR_TEST_MARK={mark}".encode() in (d / "environ").read_bytes():
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                left.append(f"{d.name} {cmd!r}")
        except OSError:
            continue
    return left


def _none_left(mark: str, grace_s: float = 5.0) -> None:
    deadline = time.monotonic() + grace_s
    while (left := _left_running(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after the launcher exited: {left}"


def _states(out: Path) -> dict[int, dict]:
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)}


def test_a_plain_ddp_script_ends_as_under_torchrun(tmp_path):
    mark = uuid.uuid4().hex
    env = _env(tmp_path, mark)
    args = ("--steps", str(STEPS))
    t0 = time.monotonic()
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(PLAIN),
            *args,
            "--out",
            str(tmp_path / "torchrun"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    t1 = time.monotonic()
    ours = subprocess.run(
        _ours("--standbys", "0", "--timeout", "120", str(PLAIN), *args, "--out", str(tmp_path / "ours")),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
    )
    t2 = time.monotonic()
    print(f"torchrun {t1 - t0:.1f} s, flashrecovery run {t2 - t1:.1f} s")
    assert ours.returncode == 0, ours.stdout[-2000:] + ours.stderr[-3000:]
    assert "[rank0]: step 10 loss" in ours.stdout  # worker output reaches the terminal
    assert "finished: every rank exited 0" in ours.stdout
    same, why = states_equal(_states(tmp_path / "torchrun"), _states(tmp_path / "ours"))
    assert same, why
    _none_left(mark)
    assert not list((tmp_path / "rt" / "jobs").glob("*.json")), "the job's address file outlived it"


def test_tools_find_a_running_job_and_a_dead_plain_rank_ends_the_run(tmp_path):
    mark = uuid.uuid4().hex
    env = _env(tmp_path, mark)
    (tmp_path / "loop.py").write_text(LOOP)
    proc = subprocess.Popen(
        _ours("--timeout", "120", "loop.py"),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while not any(line.startswith("[rank1]: alive") for line in out):
            assert proc.poll() is None, "".join(out + err)[-3000:]
            assert time.monotonic() < deadline, "the ranks never started: " + "".join(out + err)[-3000:]
            time.sleep(0.2)
        tool = [sys.executable, "-m", "flashrecovery"]
        status = subprocess.run(
            [*tool, "status", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stderr[-2000:]
        view = json.loads(status.stdout)
        assert view["world_size"] == 2 and [r["rank"] for r in view["ranks"]] == [0, 1]
        assert all(r["pid"] for r in view["ranks"]), view["ranks"]
        inject = subprocess.run(
            [*tool, "inject", "process-crash", "--rank", "1"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert inject.returncode == 0, inject.stderr[-2000:]
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for t in readers:
        t.join(10)
    assert code == 1, "".join(out + err)[-3000:]
    failed = [line for line in err if "FAILED:" in line]
    assert len(failed) == 1, "".join(err)[-3000:]
    assert "FAILED: rank 1 (pid" in failed[0] and "(signal 9)" in failed[0] and "cannot be recovered" in failed[0]
    _none_left(mark)
