"""The torchrun baseline: the same job under `torchrun --max-restarts=3` with a checkpoint every
K steps; one worker SIGKILLed at step S; the whole group restarts and resumes from disk.

RTO = fault -> the first step committed after the restart (rank 0's progress log).
Steps recomputed = last step before the fault - (first step after restart - 1); all of them are
committed steps lost (their work is discarded and done again).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NPROC = 8
TP = 2


def _read(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _wait(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"torchrun exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll)


def torchrun_argv(
    run_dir: Path,
    steps: int,
    ckpt_every: int,
    max_restarts: int = 3,
    extra: list[str] | None = None,
    nproc: int = NPROC,
    tp: int = TP,
) -> list[str]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [
        torchrun,
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1",
        "-m",
        "flashrecovery.bench.baseline_train",
        "--steps",
        str(steps),
        "--tp",
        str(tp),
        "--ckpt-every",
        str(ckpt_every),
        "--dir",
        str(run_dir),
        *(extra or []),
    ]


def step_sleep_args(step_sleep: float) -> list[str]:
    """The job flags that make every system's steps sleep (none for 0): one spelling for all."""
    return ["--step-sleep", str(step_sleep)] if step_sleep else []


def kill_recorded_workers(run_dir: Path, module: str) -> None:
    """SIGKILL every worker whose pid run_dir/pids.log records (last field of a row) and that
    still runs ``module`` for this run_dir. torchrun starts each worker in a session of its own,
    so killing torchrun's process group does not reach them."""
    for row in _read(run_dir / "pids.log"):
        try:
            pid = int(row[-1])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (ValueError, IndexError, OSError):
            continue
        if module.encode() in cmdline and str(run_dir).encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_torchrun(proc: subprocess.Popen, run_dir: Path, module: str) -> None:
    """torchrun first (so nothing restarts), then the workers it left: all by pid."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    kill_recorded_workers(run_dir, module)


def run_baseline(
    run_dir: Path,
    ckpt_every: int,
    at_step: int,
    steps: int,
    kill_rank: int = 2,
    timeout_s: float = 600.0,
    faults_every_s: float | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """One torchrun job; SIGKILL `kill_rank` once rank 0 committed `at_step` (attempt 0)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    progress, pids = run_dir / "progress.log", run_dir / "pids.log"
    log = (run_dir / "torchrun.log").open("wb")
    started = time.time()
    proc = subprocess.Popen(
        torchrun_argv(run_dir, steps, ckpt_every, extra=extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    rep: dict[str, Any] = {
        "ckpt_every": ckpt_every,
        "at_step": at_step,
        "steps": steps,
        "kill_rank": kill_rank,
        "nproc": NPROC,
        "tp": TP,
        "run_dir": os.path.relpath(run_dir),
    }
    try:
        _wait(
            lambda: any(r[0] == "0" and int(r[1]) >= at_step for r in _read(progress)),
            timeout_s,
            f"step {at_step}",
            proc,
        )
        pid = next(int(r[2]) for r in _read(pids) if r[0] == "0" and r[1] == str(kill_rank))
        fault_at = time.time()
        os.kill(pid, signal.SIGKILL)
        last_before = max(int(r[1]) for r in _read(progress) if r[0] == "0")
        first = _wait(
            lambda: next((r for r in _read(progress) if r[0] != "0"), None),
            timeout_s,
            "the first step after restart",
            proc,
        )
        first_step, first_at = int(first[1]), float(first[2])
        # last_before is re-read after the restart: rank 0 may have committed one more step
        # between our read and its own death.
        last_before = max([last_before] + [int(r[1]) for r in _read(progress) if r[0] == "0"])
        rc = proc.wait(timeout_s)
        ended = time.time()
        restarted = sorted({int(r[0]) for r in _read(pids)})
        rep.update(
            {
                "rc": rc,
                "fault_at": fault_at,
                "rto_s": round(first_at - fault_at, 3),
                "last_step_before_fault": last_before,
                "first_step_after_restart": first_step,
                "steps_recomputed": max(0, last_before - (first_step - 1)),
                "committed_steps_lost": max(0, last_before - (first_step - 1)),
                "attempts": len(restarted),
                "processes_restarted": NPROC * (len(restarted) - 1),
                "wall_s": round(ended - started, 2),
                "step_times_s": _step_times(progress),
            }
        )
        return rep
    finally:
        stop_torchrun(proc, run_dir, "flashrecovery.bench.baseline_train")
        log.close()


def _step_times(progress: Path) -> list[float]:
    """Rank 0's time between consecutive committed steps of one attempt."""
    rows = _read(progress)
    out = []
    for (a0, _, t0), (a1, _, t1) in zip(rows, rows[1:]):
        if a0 == a1:
            out.append(round(float(t1) - float(t0), 4))
    return out


def final_states(run_dir: Path, world: int = NPROC) -> dict[int, dict]:
    import torch

    return {r: torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(world)}
