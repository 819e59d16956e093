"""The TorchFT baseline: the same job and fault as bench/baseline.py, under torchft.

One lighthouse (`torchft_lighthouse`) and one `torchrun --nproc-per-node=<tp> --max-restarts=3`
per replica group (dp = `replicas`); each runs bench/torchft_train.py. After the replica group
holding the reference job's rank `kill_rank` (group kill_rank // tp, local rank kill_rank % tp)
has committed step S, that process is SIGKILLed. Its torchrun restarts the group (both tp ranks),
which heals from a live replica; the other groups keep training without it.

Definitions (every time is a wall-clock time from the progress logs, fault = the SIGKILL):
  rto_s              fault -> the restarted group commits its first step (every replica trains
                     again: the same event as "every rank committed the first step after
                     recovery" in the other columns)
  rto_survivors_s    fault -> every surviving group that did not crash itself has committed a
                     step after the fault (training goes on at reduced width)
  survivor_groups_crashed  groups other than the victim's that torchrun had to restart
  steps_recomputed   steps whose work was thrown away and done again: the most should_commit=False
                     rounds of one surviving group after the fault
  committed_steps_lost  committed steps rolled back and done again: the most step numbers one
                     group committed twice (torchft keeps the survivors' state, so 0 is expected)
  microbatches_dropped  sum over steps committed after the fault of (replicas - participants):
                     data a torchft job skips while a group is down or healing (not recomputed)
  survivors_pids_kept   every process of every other group kept its pid (no restart)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .baseline import _read, _wait, kill_recorded_workers

REPLICAS = 4
TP = 2
INSTALL_HINT = (
    "pip install --no-deps torchft-nightly && pip install opentelemetry-api opentelemetry-sdk "
    "opentelemetry-exporter-otlp-proto-http (see docs/benchmarks.md)"
)


def torchft_available() -> str | None:
    """None when torchft imports and its lighthouse can be started, else why not."""
    try:
        import torchft  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the suite cannot run
        return f"torchft not installed: {INSTALL_HINT} ({type(exc).__name__}: {exc})"
    if not _lighthouse_bin().exists():
        return f"torchft installed without its torchft_lighthouse entry point: {INSTALL_HINT}"
    return None


def _lighthouse_bin() -> Path:
    return Path(sys.executable).with_name("torchft_lighthouse")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- pure: progress logs -> the report fields (unit-tested) ---------------------------------------


def parse_progress(lines: list[list[str]]) -> list[tuple[int, int, float, int, bool]]:
    """Rows "<attempt> <step> <time> <participants> <committed>" -> tuples."""
    return [(int(a), int(s), float(t), int(p), c == "1") for a, s, t, p, c in (r[:5] for r in lines if len(r) >= 5)]


def summarize(
    progress: dict[int, list[tuple[int, int, float, int, bool]]], fault_at: float, victim: int, replicas: int
) -> dict[str, Any]:
    """The report fields from every group's parsed progress log (see the module docstring)."""
    # A restarted group's rows count once it healed: one that came back after the others had
    # finished commits step 1 alone and stops (not a recovery, not a rollback).
    committed = {r: [row for row in rows if row[4] and (row[0] == 0 or row[1] > 1)] for r, rows in progress.items()}
    before = [row[1] for rows in committed.values() for row in rows if row[2] <= fault_at]
    last_before = max(before, default=0)
    survivors = [r for r in progress if r != victim]
    crashed = sorted(r for r in survivors if any(row[0] > 0 for row in progress[r]))
    first_after = {r: next((row for row in committed[r] if row[2] > fault_at), None) for r in survivors}
    kept = [row for r, row in first_after.items() if r not in crashed]
    restarted = next((row for row in committed.get(victim, []) if row[0] > 0 and row[2] > fault_at), None)
    failed = {r: sum(1 for row in progress[r] if not row[4] and row[2] > fault_at) for r in survivors}
    out: dict[str, Any] = {
        "last_step_before_fault": last_before,
        "restarted_group_rejoined": restarted is not None,
        "rto_s": None if restarted is None else round(restarted[2] - fault_at, 3),
        "first_step_after_restart": None if restarted is None else restarted[1],
        "rto_survivors_s": None if not kept or None in kept else round(max(row[2] for row in kept) - fault_at, 3),
        "survivor_groups_crashed": crashed,
        "steps_recomputed": max(failed.values(), default=0),
    }
    # a rolled-back step is committed twice by the same group (once before, once after the fault)
    out["committed_steps_lost"] = max(
        (len(steps) - len(set(steps)) for steps in ([row[1] for row in rows] for rows in committed.values())), default=0
    )
    # one row per committed step: the most participants any group saw for it
    width: dict[int, int] = {}
    for rows in committed.values():
        for _, step, t, parts, _ in rows:
            if t > fault_at:
                width[step] = max(width.get(step, 0), parts)
    out["microbatches_dropped"] = sum(replicas - w for w in width.values())
    out["steps_at_reduced_width"] = sum(1 for w in width.values() if w < replicas)
    return out


def pids_by_replica(rows: list[list[str]]) -> dict[int, dict[int, set[int]]]:
    """pids.log rows "<replica> <attempt> <local rank> <pid>" -> {replica: {attempt: {pid}}}."""
    out: dict[int, dict[int, set[int]]] = {}
    for r in rows:
        if len(r) >= 4:
            out.setdefault(int(r[0]), {}).setdefault(int(r[1]), set()).add(int(r[3]))
    return out


# ---- the run -----------------------------------------------------------------------------------


class TorchftJob:
    """One torchft job: a lighthouse (`--min_replicas 1`) and one `torchrun --nproc-per-node=<tp>`
    per replica group running bench/torchft_train.py; every process is ours and killed by pid at
    close(). `stall_for(r)`: extra flags for group r (fault injection)."""

    def __init__(
        self,
        run_dir: Path,
        steps: int,
        replicas: int = REPLICAS,
        tp: int = TP,
        max_restarts: int = 3,
        heartbeat_timeout_ms: int = 1000,
        ft_timeout_s: float = 30.0,
        threads: int = 1,
        extra: list[str] | None = None,
        stall_for: Callable[[int], list[str]] = lambda r: [],
    ) -> None:
        self.run_dir, self.steps, self.replicas, self.tp = run_dir, steps, replicas, tp
        self.max_restarts, self.heartbeat_timeout_ms, self.ft_timeout_s = (
            max_restarts,
            heartbeat_timeout_ms,
            ft_timeout_s,
        )
        self.threads, self.extra, self.stall_for = threads, extra or [], stall_for
        self.procs: list[subprocess.Popen] = []
        self.groups: list[subprocess.Popen] = []
        self._logs: list[Any] = []

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
        log = (self.run_dir / log_name).open("wb")
        self._logs.append(log)
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append(p)
        return p

    def check_alive(self, *_: Any) -> None:
        for p in self.procs:
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"{p.args[0]} (pid {p.pid}) exited with {p.returncode}; see {self.run_dir}")

    def start(self, timeout_s: float) -> None:
        """Launch everything, wait until every group's Manager exists, then let them train."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TORCHFT_LIGHTHOUSE": f"http://localhost:{port}",
            "TORCHFT_USE_OTEL": "false",
        }
        self._spawn(
            [
                str(_lighthouse_bin()),
                "--bind",
                f"[::]:{port}",
                "--min_replicas",
                "1",
                "--heartbeat_timeout_ms",
                str(self.heartbeat_timeout_ms),
                "--join_timeout_ms",
                "60000",
            ],
            "lighthouse.log",
            env,
        )
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        for r in range(self.replicas):
            argv = [
                torchrun,
                "--standalone",
                f"--nproc-per-node={self.tp}",
                f"--max-restarts={self.max_restarts}",
                "--monitor-interval=0.1",
                "-m",
                "flashrecovery.bench.torchft_train",
                "--replica-id",
                str(r),
                "--steps",
                str(self.steps),
                "--tp",
                str(self.tp),
                "--threads",
                str(self.threads),
                "--timeout",
                str(self.ft_timeout_s),
                "--dir",
                str(self.run_dir),
                *self.stall_for(r),
                *self.extra,
            ]
            self.groups.append(self._spawn(argv, f"replica{r}.log", env))
        _wait_alive(
            lambda: all((self.run_dir / f"ready-r{r}").exists() for r in range(self.replicas)),
            timeout_s,
            "every replica's Manager",
            self.check_alive,
        )
        (self.run_dir / "go").touch()

    def progress(self, r: int) -> list[tuple[int, int, float, int, bool]]:
        return parse_progress(_read(self.run_dir / f"progress-r{r}.log"))

    def committed(self, r: int) -> list[tuple[int, int, float, int, bool]]:
        return [row for row in self.progress(r) if row[4]]

    def pid_of(self, replica: int, local_rank: int) -> int | None:
        """The newest attempt's process in that place (pids.log)."""
        rows = [r for r in _read(self.run_dir / "pids.log") if len(r) >= 4 and r[0] == str(replica)]
        rows = [r for r in rows if r[2] == str(local_rank)]
        return int(max(rows, key=lambda r: int(r[1]))[3]) if rows else None

    def close(self) -> None:
        # torchruns first (so nothing restarts), then their workers (torchrun puts each worker in
        # a session of its own, so killing a torchrun's group does not reach them): all by pid.
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
        kill_recorded_workers(self.run_dir, "flashrecovery.bench.torchft_train")
        for log in self._logs:
            log.close()


def run_torchft(
    run_dir: Path,
    at_step: int,
    steps: int,
    kill_rank: int = 2,
    timeout_s: float = 600.0,
    replicas: int = REPLICAS,
    tp: int = TP,
    fault: str = "after-step",
    heartbeat_timeout_ms: int = 1000,
    ft_timeout_s: float = 30.0,
    threads: int = 1,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """One torchft job; SIGKILL the process in rank `kill_rank`'s place once it committed `at_step`.

    fault="after-step": as bench/baseline.py (it dies wherever it is after step S committed).
    fault="in-allreduce": it stops right before the gradient all-reduce of step S + 1 and is
    killed there once its peers had 0.5 s to enter the all-reduce and block on it."""
    victim, victim_local = divmod(kill_rank, tp)
    if victim >= replicas:
        raise ValueError(f"rank {kill_rank} is not in a {replicas} x {tp} job")
    job = TorchftJob(
        run_dir,
        steps,
        replicas,
        tp,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
        ft_timeout_s=ft_timeout_s,
        threads=threads,
        extra=extra,
        stall_for=lambda r: (
            ["--stall-at", str(at_step + 1), "--stall-rank", str(victim_local)]
            if fault == "in-allreduce" and r == victim
            else []
        ),
    )
    rep: dict[str, Any] = {
        "at_step": at_step,
        "steps": steps,
        "kill_rank": kill_rank,
        "replicas": replicas,
        "tp": tp,
        "fault": fault,
        "heartbeat_timeout_ms": heartbeat_timeout_ms,
        "ft_timeout_s": ft_timeout_s,
        "run_dir": os.path.relpath(run_dir),
    }
    started = time.time()
    try:
        job.start(timeout_s)
        if fault == "in-allreduce":
            _wait_alive(lambda: (run_dir / "stalled").exists(), timeout_s, "the victim to stall", job.check_alive)
            time.sleep(0.5)
        else:
            _wait_alive(
                lambda: any(row[1] >= at_step for row in job.committed(victim)),
                timeout_s,
                f"step {at_step}",
                job.check_alive,
            )
        pids0 = pids_by_replica(_read(run_dir / "pids.log"))
        victim_pid = next(
            int(row[3])
            for row in _read(run_dir / "pids.log")
            if row[0] == str(victim) and row[1] == "0" and row[2] == str(victim_local)
        )
        fault_at = time.time()
        os.kill(victim_pid, signal.SIGKILL)
        rep.update(
            {"fault_at": fault_at, "killed_pid": victim_pid, "loadavg_at_fault": [round(x, 2) for x in os.getloadavg()]}
        )
        _wait_alive(
            lambda: (
                any(row[0] > 0 and row[2] > fault_at and row[1] > 1 for row in job.committed(victim))
                or any(run_dir.glob(f"not-healed-r{victim}-*"))
            ),
            timeout_s,
            "the restarted group's first step",
            job.check_alive,
        )
        deadline = time.monotonic() + timeout_s
        for p in job.groups:
            rc = p.wait(max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"replica torchrun exited with {rc}; see {run_dir}")
        ended = time.time()
        pids = pids_by_replica(_read(run_dir / "pids.log"))
        progress = {r: job.progress(r) for r in range(replicas)}
        rep.update(summarize(progress, fault_at, victim, replicas))
        survivors = [r for r in range(replicas) if r != victim]
        finals: dict[int, set[str]] = {}
        for r in range(replicas):
            for i in range(tp):
                f = run_dir / f"final-r{r}-{i}.txt"
                if f.exists():
                    finals.setdefault(i, set()).add(f.read_text().split()[1])
        rep.update(
            {
                "survivors_pids_kept": all(
                    set(pids.get(r, {})) == {0} and pids[r][0] == pids0[r][0] for r in survivors
                ),
                "processes_restarted": sum(len(v) for r in pids for a, v in pids[r].items() if a > 0),
                "replicas_consistent": bool(finals) and all(len(v) == 1 for v in finals.values()),
                "wall_s": round(ended - started, 2),
            }
        )
        return rep
    finally:
        job.close()


# ---- goodput (issue #14 item 4) ------------------------------------------------------------------


def full_width_steps(
    progress: dict[int, list[tuple[int, int, float, int, bool]]], replicas: int, since: float, until: float
) -> tuple[float, int]:
    """(steps weighted by the share of replica groups that trained them, distinct steps) committed
    in (since, until]. torchft commits a step at reduced width while a group is down or healing
    (that group's micro-batches are skipped, not recomputed), so a step is worth participants /
    replicas of a full one; goodput counts work, as it does for the other systems."""
    width: dict[int, int] = {}
    for rows in progress.values():
        for _, step, t, parts, ok in rows:
            if ok and since < t <= until:
                width[step] = max(width.get(step, 0), parts)
    return sum(min(w, replicas) / replicas for w in width.values()), len(width)


def goodput_torchft(
    duration_s: float,
    run_dir: Path,
    fault_times: list[float],
    pick_rank: Callable[[int], int],
    ft_timeout_s: float = 5.0,
    heartbeat_timeout_ms: int = 1000,
    replicas: int = REPLICAS,
    tp: int = TP,
    timeout_s: float = 300.0,
    steps: int = 100_000,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """The goodput run under torchft: the same seeded fault times as the other systems, each a
    SIGKILL of the process in a random rank's place (newest attempt). torchrun restarts that
    group; it heals from a live group while the others train on. Its fault-free s/step comes from
    the same run, before the first fault (all groups up). pick_rank(world) -> the victim rank."""
    world = replicas * tp
    job = TorchftJob(
        run_dir,
        steps,
        replicas,
        tp,
        max_restarts=len(fault_times) + 1,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
        ft_timeout_s=ft_timeout_s,
        extra=extra,
    )
    faults: list[dict[str, Any]] = []
    try:
        job.start(timeout_s)
        _wait_alive(
            lambda: all(job.committed(r) for r in range(replicas)),
            timeout_s,
            "every group's first step",
            job.check_alive,
        )
        t0_wall, t0 = time.time(), time.monotonic()
        for at in fault_times:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            rank = pick_rank(world)
            pid = job.pid_of(*divmod(rank, tp))
            try:
                if pid is None:
                    raise ProcessLookupError
                os.kill(pid, signal.SIGKILL)
                faults.append({"at_s": round(time.monotonic() - t0, 1), "rank": rank, "pid": pid})
            except ProcessLookupError:
                faults.append({"at_s": round(time.monotonic() - t0, 1), "skipped": f"rank {rank}: no process"})
        time.sleep(max(0.0, t0 + duration_s - time.monotonic()))
        wall = time.monotonic() - t0
        end_wall = t0_wall + wall
        progress = {r: job.progress(r) for r in range(replicas)}
        first_fault = t0_wall + (fault_times[0] if fault_times else wall)
        clean, clean_steps = full_width_steps(progress, replicas, t0_wall, first_fault)
        s_per_step = (first_fault - t0_wall) / clean if clean else None
        work, distinct = full_width_steps(progress, replicas, t0_wall, end_wall)
        goodput = round(work * s_per_step / wall, 3) if s_per_step else None
        restarts = sum(len(a) - 1 for a in pids_by_replica(_read(run_dir / "pids.log")).values())
        return {
            "duration_s": round(wall, 1),
            "faults": faults,
            "ft_timeout_s": ft_timeout_s,
            "heartbeat_timeout_ms": heartbeat_timeout_ms,
            "group_restarts": restarts,
            "net_steps": distinct,
            "full_width_steps": round(work, 2),
            "steps_per_s": round(distinct / wall, 3),
            "goodput": goodput,
            "s_per_step_fault_free": round(s_per_step, 4) if s_per_step else None,
            "s_per_step_from": f"this run before its first fault ({clean_steps} steps, every group up)",
            # its goodput is already against its own run's rate before the first fault
            "lead_in_steps_per_s": round(1 / s_per_step, 3) if s_per_step else None,
            "goodput_vs_lead_in": goodput,
        }
    finally:
        job.close()


def _wait_alive(pred, timeout_s: float, what: str, check) -> Any:
    """bench.baseline._wait, also failing early when one of our processes died with an error."""

    def ready():
        check()
        return pred()

    return _wait(ready, timeout_s, what)
