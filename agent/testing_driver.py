"""A local test driver that plays sidecar + executor for the reference job.

It starts a TCPStore master on a free loopback port, listens on one Unix socket per "node"
(plus one for the spare node holding the standbys), launches ``nodes x per_node`` ranks and the
standbys, and reacts to faults the way the production services should:

  detect (process exit / channel EOF / ECC line on stderr / no step progress for hang_timeout_s)
  -> SIGKILL the culprit by PID -> pause{g} to every survivor -> collect paused reports
  (a survivor that does not answer in pause_timeout_s is a hung rank: SIGKILL it too)
  -> decide_recovery(reports) -> plan_transfers -> assign a standby to each failed rank
  -> recover{g+1, ...} to everyone -> wait for progress "resumed" from every rank.

Every process it starts is killed by PID in ``close()``; every wait has a timeout.
The executor service can read this as an executable description of the recovery sequence.
"""

from __future__ import annotations

import datetime
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from . import channel as ch
from .commit_rule import RecoveryDecision, decide_recovery, plan_transfers

ECC_RE = re.compile(r"Xid .*(uncorrectable|double bit error|DBE)", re.IGNORECASE)
GLOO_RE = re.compile(r"Connection closed by peer|Connection reset by peer|Timed out waiting")
FAULT_RE = re.compile(r"flashrecovery-fault: inject .* rank=(\d+) .* t=([0-9.]+)")


class DriverError(RuntimeError):
    pass


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    node_id: str
    rank: int | None
    local_rank: int | None
    standby: bool
    log_path: str
    conn: ch.Connection | None = None
    hello_t: float | None = None
    finished: bool = False  # stop sent: an exit is expected

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class RecoveryRecord:
    generation: int
    failed: list[int]
    t_fault: float | None  # from the injected process's own stderr line, if any
    t_detect: float
    t_paused: float = 0.0
    t_recover_sent: float = 0.0
    t_resumed: float = 0.0
    t_first_commit: float | None = None
    decision: RecoveryDecision | None = None
    transfers: list[tuple[int, int]] = field(default_factory=list)
    max_step_before: int = 0
    rebuilt_s: dict[int, float] = field(default_factory=dict)
    restored_s: dict[int, float] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)
    digest_ok: dict[int, bool] = field(default_factory=dict)

    @property
    def lost_steps(self) -> int:
        assert self.decision is not None
        return max(0, self.max_step_before - (self.decision.resume_step - 1))

    def summary(self) -> dict[str, Any]:
        t0 = self.t_fault if self.t_fault is not None else self.t_detect
        return {
            "generation": self.generation, "failed": self.failed,
            "fault_to_detect_s": self.t_detect - t0, "fault_to_paused_s": self.t_paused - t0,
            "rebuild_s": max(self.rebuilt_s.values(), default=0.0),
            "transfer_s": max(self.restored_s.values(), default=0.0),
            "transfer_bytes": sum(self.bytes.values()),
            "fault_to_resumed_s": self.t_resumed - t0,
            "fault_to_first_commit_s": (self.t_first_commit - t0) if self.t_first_commit else None,
            "commit_step": self.decision.commit_step if self.decision else None,
            "resume_step": self.decision.resume_step if self.decision else None,
            "lost_steps": self.lost_steps if self.decision else None,
            "reason": self.decision.reason if self.decision else None,
        }


@dataclass
class RunResult:
    out_dir: str
    start_pids: dict[int, int]
    final_pids: dict[int, int]
    done: dict[int, ch.Done]
    recoveries: list[RecoveryRecord]
    wall_s: float


def _sigkill(p: Proc) -> None:
    """SIGKILL by PID unless already reaped (the exit watcher thread reaps concurrently, so
    ``poll()`` may say 'running' for a process that is gone)."""
    if p.popen.returncode is None:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalCluster:
    def __init__(self, steps: int = 30, nodes: int = 4, per_node: int = 2, tp: int = 2,
                 standbys: int = 2, fault: str | None = None, seed: int = 1234,
                 train_args: tuple[str, ...] = (), workdir: str | None = None,
                 hang_timeout_s: float = 5.0, pause_timeout_s: float = 5.0,
                 command_timeout_s: float = 120.0, env: dict[str, str] | None = None,
                 verbose: bool = False, kill_ranks: list[int] | None = None,
                 kill_first_step: int = 6, kill_gap_steps: int = 20,
                 replenish_standbys: bool = False) -> None:
        self.steps, self.nodes, self.per_node, self.tp = steps, nodes, per_node, tp
        self.world = nodes * per_node
        self.n_standbys, self.fault, self.seed = standbys, fault, seed
        self.train_args = train_args
        self.workdir = workdir or tempfile.mkdtemp(prefix="fr-agent-")
        self.sockdir = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # short: AF_UNIX path limit
        self.out_dir = os.path.join(self.workdir, "out")
        self.hang_timeout_s, self.pause_timeout_s = hang_timeout_s, pause_timeout_s
        self.command_timeout_s = command_timeout_s
        self.extra_env = env or {}
        self.verbose = verbose
        # external faults (what a bench needs: repeatable, hits any process, replacements too):
        # SIGKILL kill_ranks[i] by PID once a rank committed kill_first_step (then
        # kill_gap_steps after the previous recovery's resume step) and a standby is warm
        self.kill_plan = list(kill_ranks or [])
        self.kill_first_step, self.kill_gap_steps = kill_first_step, kill_gap_steps
        self._kill_pending = False
        self.replenish_standbys = replenish_standbys
        self._standby_seq = standbys
        self.job_id = f"job{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.generation = 0
        self.procs: list[Proc] = []
        self.ranks: dict[int, Proc] = {}
        self.events: queue.Queue[tuple[str, Proc | None, Any, float]] = queue.Queue()
        self.store: dist.TCPStore | None = None
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self.paused: dict[int, ch.Paused] = {}
        self.progress: dict[tuple[int, str], ch.Progress] = {}
        self.last_step: dict[int, int] = {}
        self.done: dict[int, ch.Done] = {}
        self.fault_times: dict[int, float] = {}
        self.recoveries: list[RecoveryRecord] = []
        self.start_pids: dict[int, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def log(self, event: str, **kw: Any) -> None:
        if self.verbose:
            print(f"[driver {time.time():.3f}] {event} {kw}", file=sys.stderr, flush=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=300))
        for n in range(self.nodes):
            self._listen(f"node{n}")
        if self.n_standbys:
            self._listen("spare")
        for r in range(self.world):
            n, lr = divmod(r, self.per_node)
            p = self._launch(f"node{n}", r, lr, standby=False)
            self.ranks[r] = p
            self.start_pids[r] = p.pid
        for i in range(self.n_standbys):
            self._launch("spare", None, i, standby=True)

    def sock_path(self, node_id: str) -> str:
        return os.path.join(self.sockdir, f"{node_id}.sock")

    def _listen(self, node_id: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.sock_path(node_id))
        s.listen(64)
        self._listeners.append(s)
        self._spawn(self._accept_loop, s)

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _launch(self, node_id: str, rank: int | None, local_rank: int, standby: bool) -> Proc:
        assert self.store is not None
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update({
            "FLASHRECOVERY_JOB_ID": self.job_id, "FLASHRECOVERY_NODE_ID": node_id,
            "FLASHRECOVERY_LOCAL_RANK": str(local_rank),
            "FLASHRECOVERY_WORLD_SIZE": str(self.world), "FLASHRECOVERY_GENERATION": "0",
            "FLASHRECOVERY_RDZV": f"127.0.0.1:{self.store.port}",
            "FLASHRECOVERY_AGENT_SOCKET": self.sock_path(node_id),
            "FLASHRECOVERY_STANDBY": "1" if standby else "0",
            "FLASHRECOVERY_COMMAND_TIMEOUT_S": str(self.command_timeout_s),
        })
        if rank is not None:
            env["FLASHRECOVERY_RANK"] = str(rank)
        else:
            env.pop("FLASHRECOVERY_RANK", None)
        if self.fault and not standby:
            env["FLASHRECOVERY_FAULT"] = self.fault
        else:
            env.pop("FLASHRECOVERY_FAULT", None)
        name = f"rank{rank}" if rank is not None else f"standby{local_rank}"
        log_path = os.path.join(self.workdir, f"{name}.log")
        cmd = [sys.executable, "-m", "flashrecovery.agent.reference.train",
               "--steps", str(self.steps), "--seed", str(self.seed), "--tp", str(self.tp),
               "--out", self.out_dir, *self.train_args]
        logf = open(log_path, "wb")
        popen = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.PIPE,
                                 start_new_session=True)
        logf.close()
        p = Proc(popen, node_id, rank, local_rank, standby, log_path)
        self.procs.append(p)
        self._spawn(self._stderr_loop, p)
        self._spawn(self._exit_watch, p)
        return p

    def close(self) -> None:
        self._closing = True
        for p in self.procs:
            _sigkill(p)
        for p in self.procs:
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if p.conn is not None:
                p.conn.close()
        for s in self._listeners:
            s.close()
        for f in os.listdir(self.sockdir):
            os.unlink(os.path.join(self.sockdir, f))
        os.rmdir(self.sockdir)
        self.store = None

    # ------------------------------------------------------------------ I/O threads
    def _accept_loop(self, s: socket.socket) -> None:
        while not self._closing:
            try:
                sock, _ = s.accept()
            except OSError:
                return
            self._spawn(self._conn_loop, ch.Connection(sock))

    def _conn_loop(self, conn: ch.Connection) -> None:
        proc: Proc | None = None
        try:
            for msg in conn.messages():
                now = time.time()
                if proc is None:
                    if not isinstance(msg, ch.Hello):
                        raise DriverError(f"first message must be hello, got {msg}")
                    proc = next((p for p in self.procs if p.pid == msg.pid), None)
                    if proc is None:
                        raise DriverError(f"hello from unknown pid {msg.pid}")
                    proc.conn, proc.hello_t = conn, now
                self.events.put(("msg", proc, msg, now))
        except (OSError, ValueError) as exc:
            self.events.put(("conn_error", proc, repr(exc), time.time()))
        self.events.put(("eof", proc, None, time.time()))

    def _stderr_loop(self, p: Proc) -> None:
        assert p.popen.stderr is not None
        with open(p.log_path, "ab") as logf:
            for raw in p.popen.stderr:
                logf.write(raw)
                logf.flush()
                line = raw.decode(errors="replace")
                m = FAULT_RE.search(line)
                if m:
                    self.fault_times[int(m.group(1))] = float(m.group(2))
                if ECC_RE.search(line):
                    self.events.put(("ecc", p, line.strip(), time.time()))

    def _exit_watch(self, p: Proc) -> None:
        rc = p.popen.wait()
        self.events.put(("exit", p, rc, time.time()))

    # ------------------------------------------------------------------ event handling
    def _handle(self, kind: str, p: Proc | None, payload: Any, now: float) -> set[int]:
        """Book-keeping for one event; returns ranks found failed by it."""
        failed: set[int] = set()
        if kind == "msg":
            msg = payload
            if isinstance(msg, ch.Step):
                self.last_step[msg.rank] = max(self.last_step.get(msg.rank, 0), msg.step)
                self._last_progress = now
                for rec in self.recoveries:
                    if (rec.t_first_commit is None and rec.decision is not None
                            and msg.step >= rec.decision.resume_step):
                        rec.t_first_commit = now
            elif isinstance(msg, ch.Paused):
                if msg.generation == self.generation:
                    self.paused[msg.rank] = msg
            elif isinstance(msg, ch.Progress):
                if msg.generation == self.generation:
                    self.progress[(msg.rank, msg.phase)] = msg
            elif isinstance(msg, ch.Done):
                self.done[msg.rank] = msg
            elif isinstance(msg, ch.Error):
                self.log("worker error", rank=msg.rank, message=msg.message)
        elif kind in ("exit", "eof", "ecc"):
            if p is not None and not p.finished and not p.standby and p.rank is not None \
                    and self.ranks.get(p.rank) is p:
                if not (kind == "eof" and p.rank in self.done):
                    failed.add(p.rank)
            if p is not None and p.standby and kind == "exit":
                self.log("standby exited", pid=p.pid)
        return failed

    def _pump(self, timeout: float) -> set[int]:
        failed: set[int] = set()
        try:
            kind, p, payload, now = self.events.get(timeout=timeout)
        except queue.Empty:
            return failed
        failed |= self._handle(kind, p, payload, now)
        return failed

    def _kill(self, rank: int) -> None:
        p = self.ranks[rank]
        p.finished = True
        _sigkill(p)
        try:
            p.popen.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:
            raise DriverError(f"rank {rank} pid {p.pid} survived SIGKILL") from exc

    # ------------------------------------------------------------------ the run
    def run(self, timeout_s: float = 300.0) -> RunResult:
        t_start = time.time()
        deadline = t_start + timeout_s
        self._last_progress: float | None = None
        while True:
            if time.time() > deadline:
                raise DriverError(f"run did not finish in {timeout_s} s; last steps "
                                  f"{self.last_step}, done {sorted(self.done)}")
            failed = self._pump(0.2)
            if len(self.done) == self.world and all(
                    d.step == self.steps for d in self.done.values()):
                break
            now = time.time()
            if (not failed and self._last_progress is not None and len(self.done) < self.world
                    and now - self._last_progress > self.hang_timeout_s):
                self.log("no step progress: hang suspected",
                         idle_s=round(now - self._last_progress, 2))
                failed = {-1}  # unknown culprit: the pause round will find it
            if not failed and self.kill_plan:
                self._maybe_external_kill()
            if failed:
                self._recover(failed, deadline)
        self._stop_all(deadline)
        return RunResult(self.out_dir, dict(self.start_pids),
                         {r: p.pid for r, p in self.ranks.items()}, dict(self.done),
                         list(self.recoveries), time.time() - t_start)

    def _maybe_external_kill(self) -> None:
        if self._kill_pending:
            return  # one fault at a time: the next only after this one's recovery
        rank = self.kill_plan[0]
        last = next((r for r in reversed(self.recoveries) if r.decision is not None), None)
        step = (self.kill_first_step if last is None or last.decision is None
                else last.decision.resume_step + self.kill_gap_steps)
        if max(self.last_step.values(), default=0) < step:
            return
        if not any(p.standby and p.conn is not None and p.popen.poll() is None
                   for p in self.procs):
            return  # wait for a warm standby, as a real pool would have one
        self.kill_plan.pop(0)
        self._kill_pending = True
        p = self.ranks[rank]
        self.fault_times[rank] = time.time()
        self.log("external kill", rank=rank, pid=p.pid, step=step)
        _sigkill(p)

    def _stop_all(self, deadline: float) -> None:
        for p in self.procs:
            if p.popen.poll() is None and p.conn is not None:
                p.finished = True
                try:
                    p.conn.send(ch.Stop())
                except OSError:
                    pass
        # Final dumps are written before `done`; a slow interpreter exit is not worth waiting
        # for: close() SIGKILLs whatever is left.
        t_end = time.time() + 5.0
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, t_end - time.time()))
            except subprocess.TimeoutExpired:
                pass

    def _recover(self, failed: set[int], deadline: float) -> None:
        t_detect = time.time()
        failed.discard(-1)
        g = self.generation
        rec = RecoveryRecord(generation=g + 1, failed=[], t_fault=None, t_detect=t_detect,
                             max_step_before=max(self.last_step.values(), default=0))
        self.log("fault detected", failed=sorted(failed), generation=g)
        for r in failed:
            self._kill(r)
        # pause round: everyone alive must report paused for generation g
        while True:
            survivors = [r for r in sorted(self.ranks) if r not in failed]
            for r in survivors:
                conn = self.ranks[r].conn
                if conn is not None:
                    try:
                        conn.send(ch.Pause(generation=g))
                    except OSError:
                        pass
            t_pause = time.time()
            new: set[int] = set()
            while time.time() - t_pause < self.pause_timeout_s:
                new |= self._pump(0.05) - failed
                if new or all(r in self.paused for r in survivors):
                    break
            if not new:
                new = {r for r in survivors if r not in self.paused}  # silent: hung
            if not new:
                break
            self.log("failed in pause round", ranks=sorted(new))
            for r in new:
                self._kill(r)
            failed |= new
        rec.t_paused = time.time()
        rec.failed = sorted(failed)
        rec.t_fault = min((self.fault_times[r] for r in failed if r in self.fault_times),
                          default=None)
        survivors = [r for r in sorted(self.ranks) if r not in failed]
        decision = decide_recovery([self.paused[r] for r in survivors])
        rec.decision = decision
        rec.transfers = plan_transfers(failed, survivors, self.tp)
        self.log("decision", commit_step=decision.commit_step,
                 resume_step=decision.resume_step, reason=decision.reason,
                 transfers=rec.transfers)
        # standbys take the failed identities
        for r in sorted(failed):
            sb = self._take_standby(deadline)
            sb.standby, sb.rank, sb.local_rank = False, r, r % self.per_node
            assert sb.conn is not None
            sb.conn.send(ch.Assign(rank=r, local_rank=r % self.per_node, node_id=sb.node_id))
            self.ranks[r] = sb
            if self.replenish_standbys:  # cold start off the critical path
                self._launch("spare", None, self._standby_seq, standby=True)
                self._standby_seq += 1
        self.generation = g + 1
        self.paused.clear()
        self.progress.clear()
        msg = ch.Recover(generation=self.generation, world_size=self.world,
                         commit_step=decision.commit_step, resume_step=decision.resume_step,
                         transfers=tuple(ch.Transfer(src=s, dst=d) for s, d in rec.transfers))
        for r in sorted(self.ranks):
            conn = self.ranks[r].conn
            assert conn is not None
            conn.send(msg)
        rec.t_recover_sent = time.time()
        while not all((r, "resumed") in self.progress for r in self.ranks):
            if time.time() > deadline:
                raise DriverError(f"recovery to generation {self.generation} did not finish; "
                                  f"progress {sorted(self.progress)}")
            more = self._pump(0.05)
            if more:
                raise DriverError(f"ranks {sorted(more)} failed during recovery")
        rec.t_resumed = time.time()
        for (r, phase), pr in self.progress.items():
            if phase == "rebuilt":
                rec.rebuilt_s[r] = pr.seconds
            elif phase == "restored":
                rec.restored_s[r] = pr.seconds
                if pr.bytes:
                    rec.bytes[r] = pr.bytes
                if pr.digest_ok is not None:
                    rec.digest_ok[r] = pr.digest_ok
        self.recoveries.append(rec)
        for r in failed:
            self.fault_times.pop(r, None)
        self._kill_pending = False
        self._last_progress = time.time()
        self.log("resumed", **rec.summary())

    def _take_standby(self, deadline: float) -> Proc:
        while True:
            for p in self.procs:
                if p.standby and p.conn is not None and p.popen.poll() is None:
                    return p
            if time.time() > deadline:
                raise DriverError("no standby available")
            if self._pump(0.05):
                raise DriverError("more failures while waiting for a standby")
