"""The per-node sidecar: launches and supervises the node's training processes, relays their
step reports as one batched heartbeat per interval, forwards error lines, sees exits at once,
and carries out the executor's commands for this node.

Spare nodes run a sidecar with no ranks that keeps standby workers pre-started (torch imported,
model built) so a replacement never pays a cold start during recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import channel as ch
from flashrecovery.shared import metrics as M
from flashrecovery.shared import topics as T
from flashrecovery.shared.logging import get_logger
from flashrecovery.shared.process import die_with_parent
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.schemas import (
    CommandAck,
    CommandAction,
    ExecutorCommand,
    LogEvent,
    NodeHeartbeat,
    NodeRole,
    RankColumns,
    RankReport,
    RankState,
    RankStatus,
    ReportColumns,
    WorkerExit,
)
from flashrecovery.shared.settings import Settings, agent_env

from .core import (
    CommandGate,
    RegistryView,
    TokenBucket,
    WorkerFate,
    WorkerPlace,
    command_refusal,
    decided_resume_step,
    lost_before_recover,
    node_rank,
    prefilter,
    ranks_to_kill,
    refill_argv,
    refill_state,
    reports_stages,
    stage_failure,
    stage_reached,
    standby_local_ranks,
    standbys_to_start,
    standbys_wanted,
    worker_argv,
    worker_env,
)
from .forked import ForkedProcess, Zygote

# How long a new standby waits for this node's ranks to train again before it starts anyway
# (a rank left paused by a WAIT plan must not cost the node its standby for good).
REFILL_WAIT_S = 60.0
# How long a standby waits for the node's zygote to finish importing before it is started as a
# new interpreter instead.
ZYGOTE_READY_S = 120.0


@dataclass
class Worker:
    proc: asyncio.subprocess.Process | ForkedProcess
    local_rank: int
    rank: int | None
    standby: bool
    log_path: Path
    writer: asyncio.StreamWriter | None = None
    state: RankState = RankState.STARTING
    step: int = 0
    step_time_s: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    long_phase: str | None = None
    long_phase_expected_s: float | None = None
    generation: int = 0
    expected_exit: bool = False
    paused: ch.Paused | None = None
    progress: set[str] = field(default_factory=set)
    progress_msgs: list[ch.Progress] = field(default_factory=list)
    bucket: TokenBucket | None = None
    assigned_at: int | None = None  # the generation in which a standby became this rank
    exited_in_generation: int | None = None  # the command generation here when it died
    recover_error: str | None = None  # what the rank reported failing in the current recover
    steps_since_recovery: int = 0  # steps committed since its last pause (core.refill_state)

    @property
    def pid(self) -> int:
        return self.proc.pid


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


class SidecarService:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.cfg = settings.sidecar
        self.node_id = self.cfg.node_id
        self.log = get_logger("sidecar", job_id=settings.job_id, node_id=self.node_id)
        self.gate = CommandGate(self.node_id)
        self.workers: dict[int, Worker] = {}  # pid -> worker
        self.run_dir = Path(settings.runtime_dir) / "sidecars" / self.node_id
        self.sock_path = Path("/tmp") / f"fr-{settings.job_id[:24]}-{self.node_id}-{os.getpid()}.sock"
        self.producer = busmod.Producer(settings.kafka_bootstrap, settings.bus, f"sidecar-{self.node_id}")
        self.consumer = busmod.Consumer(
            settings.kafka_bootstrap,
            settings.bus,
            [T.COMMANDS],
            None,
            self.on_command,
            self.producer,
            f"sidecar-{self.node_id}",
            from_latest=True,
        )
        self.registry = Registry.from_url(settings.redis_url, settings.job_id)
        self.seq = 0
        self.stopping = asyncio.Event()
        self.hello = asyncio.Condition()
        self.events = asyncio.Condition()  # any report from a worker
        self.tasks: set[asyncio.Task] = set()
        self.verify_target: dict[str, int] = {}  # command id -> resume step awaiting "verified"
        self.result: tuple[int, str] | None = None  # exit_with_job: (exit code, reason) once ended
        self.refill_lock = asyncio.Lock()
        self._pausing: asyncio.Task | None = None  # the newest PAUSE's handler
        self.standbys_off = False  # an active node's standby could not serve (a plain script)
        self.zygote: Zygote | None = None  # forks this node's standbys (sidecar.standby_fork)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.server = await asyncio.start_unix_server(self._serve_worker, path=str(self.sock_path))
        await self.producer.start()
        await self.consumer.start()
        self._spawn(self.consumer.run())
        await self.consumer.wait_assigned()
        if self._wants_zygote():
            self.zygote = Zygote(self._preimport(), 0, self.log)
            await self.zygote.start(self._prepare_child)
        # With a zygote, the node's ranks are forked by it too (sidecar.rank_fork): one torch
        # import per node, where each rank's own import made N interpreters fight for the cores
        # at the job's start (on 2 cores, 13 imports took ~50 s before step 1).
        fork_ranks = self.zygote is not None and self.cfg.rank_fork
        for local_rank, rank in enumerate(self.cfg.rank_list()):
            await self._launch(local_rank, rank, fork=fork_ranks)
        if self.zygote is not None:
            # forked once the zygote has imported torch: the node must not wait for that
            self._spawn(self._refill_standbys(at_start=True))
        else:
            await self._refill_standbys(at_start=True)
        self._spawn(self._heartbeat_loop())
        self.log.info("ready", role=self.cfg.role, ranks=self.cfg.rank_list(), socket=str(self.sock_path))

    async def run(self) -> None:
        await self.start()
        await self.stopping.wait()

    async def close(self) -> None:
        for w in list(self.workers.values()):
            w.expected_exit = True
            if w.proc.returncode is None:
                w.proc.kill()
        for w in list(self.workers.values()):
            try:
                await asyncio.wait_for(w.proc.wait(), 5)
            except TimeoutError:
                pass
        if self.zygote is not None:
            await self.zygote.close()
        self.consumer.stop()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server.close()
        self.sock_path.unlink(missing_ok=True)
        await self.producer.stop()
        await self.registry.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ------------------------------------------------------------------ workers
    def _ranked(self) -> list[Worker]:
        return sorted(
            (w for w in self.workers.values() if w.rank is not None and w.proc.returncode is None),
            key=lambda w: w.local_rank,
        )

    def _standbys(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.rank is None and w.proc.returncode is None]

    async def _launch(self, local_rank: int, rank: int | None, refill: bool = False, fork: bool = False) -> Worker:
        """Start a worker: a rank, or a standby (rank None). A standby, or a rank with `fork`,
        is forked by the node's zygote when there is one; else a new interpreter, which for a
        refill (started while the job trains) may import torch in a low-priority thread first
        (refill_argv)."""
        hosted = self.cfg.rank_list()
        env = worker_env(
            dict(os.environ),
            WorkerPlace(
                job_id=self.s.job_id,
                node_id=self.node_id,
                node_rank=node_rank(self.cfg.node_rank, hosted),
                rank=rank,
                local_rank=local_rank,
                local_world_size=self.cfg.local_world_size or len(hosted) or self.cfg.capacity,
                world_size=self.cfg.world_size,
                generation=self.gate.generation,
                rdzv=self.s.rdzv or "",
                agent_socket=str(self.sock_path),
                local_rank_base=self.cfg.local_rank_base,
            ),
        )
        env.setdefault(agent_env("rebuild_timeout_s"), str(self.cfg.rebuild_timeout_s))
        argv = worker_argv(
            sys.executable,
            "" if self.cfg.worker_script else self.cfg.worker_module,
            self.cfg.worker_script,
            shlex.split(self.cfg.worker_args),
        )
        proc = await self._fork(argv, env) if rank is None or fork else None
        if proc is None:
            if refill:
                argv = refill_argv(argv, self.cfg.standby_refill_nice, self._preimport())
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=self._prepare_child,
            )
        name = f"rank{rank}" if rank is not None else f"standby{proc.pid}"
        w = Worker(
            proc=proc,
            local_rank=local_rank,
            rank=rank,
            standby=rank is None,
            log_path=self.run_dir / f"{name}.log",
            generation=self.gate.generation,
            state=RankState.STARTING if rank is not None else RankState.STANDBY,
            bucket=TokenBucket(self.cfg.log_lines_per_s, self.cfg.log_burst),
        )
        self.workers[proc.pid] = w
        self._spawn(self._watch_exit(w))
        self._spawn(self._tail(w, proc.stdout, "stdout"))
        self._spawn(self._tail(w, proc.stderr, "stderr"))
        self.log.info(
            "worker_started", rank=rank, pid=proc.pid, standby=rank is None, forked=isinstance(proc, ForkedProcess)
        )
        return w

    def _prepare_child(self) -> None:
        if self.cfg.worker_nice:
            os.nice(self.cfg.worker_nice)
        # A worker never outlives its sidecar: the node is the sidecar and its workers.
        die_with_parent(signal.SIGKILL)

    def _preimport(self) -> list[str]:
        return [m.strip() for m in self.cfg.standby_preimport.split(",") if m.strip()]

    def _wants_zygote(self) -> bool:
        wanted = standbys_wanted(self.cfg.role, self.cfg.capacity, len(self.cfg.rank_list()), self.cfg.standbys)
        return self.cfg.standby_fork and wanted > 0 and bool(self._preimport())

    async def _fork(self, argv: list[str], env: dict[str, str]) -> ForkedProcess | None:
        """A worker forked by the node's zygote, or None (no zygote, not ready in time, or it
        failed): the caller then starts a new interpreter."""
        z = self.zygote
        if z is None or not z.alive:
            return None
        try:
            await asyncio.wait_for(z.ready.wait(), ZYGOTE_READY_S)
            return await z.spawn(argv[1:], env, self.cfg.worker_nice)
        except (TimeoutError, OSError, RuntimeError) as exc:
            self.log.warning("zygote_fork_failed", error=repr(exc), fallback="new interpreter")
            return None

    async def _refill_standbys(self, at_start: bool = False) -> None:
        """Keep this node's warm standbys (core.standbys_wanted). At the sidecar's start they
        start with its ranks (the job is starting anyway; started later they would import torch
        while it trains, and on a shared machine stall it). A refill waits until its ranks
        train, or REFILL_WAIT_S if they do not, so a recovery here never shares its CPU with a
        new interpreter importing torch."""
        if self.standbys_off:
            return
        async with self.refill_lock:

            def due(waited_out: bool = False) -> int:
                wanted = standbys_wanted(self.cfg.role, self.cfg.capacity, len(self._ranked()), self.cfg.standbys)
                states = [refill_state(w.state, w.steps_since_recovery) for w in self._ranked()]
                return standbys_to_start(wanted, len(self._standbys()), states, waited_out)

            if due(waited_out=True) == 0:
                return
            ranks_train = at_start or await self._wait_for(lambda: self.stopping.is_set() or due() > 0, REFILL_WAIT_S)
            if self.stopping.is_set() or self.standbys_off:
                return
            n = due(waited_out=at_start or not ranks_train)
            used = [w.local_rank for w in self._ranked()] + [w.local_rank for w in self._standbys()]
            for local_rank in standby_local_ranks(used, n):
                await self._launch(local_rank, None, refill=not at_start)
            if n:
                self.log.info("standbys_started", count=n, at_start=at_start, waited_out=not ranks_train)

    async def _watch_exit(self, w: Worker) -> None:
        rc = await w.proc.wait()
        # A worker that never connected to the agent is a plain script (or one that died while
        # starting): exit code 0 is its end of training; anything else nothing can repair, since
        # recovery needs the agent in the surviving ranks, the replacement and the replicas.
        plain = w.writer is None and not w.expected_exit
        if plain and rc == 0 and w.rank is not None:
            w.state = RankState.DONE
        w.state = RankState.EXITED if w.state != RankState.DONE else RankState.DONE
        w.exited_in_generation = self.gate.generation
        sig = -rc if rc < 0 else None
        expected = w.expected_exit or (rc == 0 and w.state == RankState.DONE)
        self.log.info("worker_exited", rank=w.rank, pid=w.pid, code=rc, signal=sig, expected=expected)
        if not self.stopping.is_set():
            await self.producer.publish(
                WorkerExit(
                    job_id=self.s.job_id,
                    generation=self.gate.generation,
                    producer=f"sidecar-{self.node_id}",
                    node_id=self.node_id,
                    rank=w.rank,
                    pid=w.pid,
                    exit_code=None if sig else rc,
                    signal=sig,
                    step=w.step,
                    expected=expected,
                ),
                wait=True,
            )
        async with self.events:
            self.events.notify_all()
        if w.rank is None and not self.stopping.is_set():
            if w.writer is not None:  # a standby that worked: start another (an OOM kill, say)
                self._spawn(self._refill_standbys())
            elif self.cfg.role == "active" and not w.expected_exit:
                # An active node's standbys only speed up restarts in place: a worker that cannot
                # be one (a plain script has no agent to wait in) costs the job nothing but them.
                self.standbys_off = True
                self.log.warning(
                    "standbys_off",
                    pid=w.pid,
                    code=rc,
                    reason="a standby ended without connecting to the agent; restarts here start cold",
                )
                return
        if plain and w.state == RankState.DONE:
            await self._finished(w, w.step)
        elif plain and self.cfg.exit_with_job and not self.stopping.is_set():
            how = f"signal {sig}" if sig else f"exit code {rc}"
            if w.rank is None:
                why = (
                    f"a standby (pid {w.pid}) ended ({how}) without connecting to the agent: a plain "
                    "script (no flashrecovery agent) cannot have standbys, use --standbys 0"
                )
            else:
                why = (
                    f"rank {w.rank} (pid {w.pid}) ended ({how}) and cannot be recovered: it never "
                    "connected to the flashrecovery agent (a plain script)"
                )
            self._end(1, f"{why}; its output: {w.log_path}")
        await self._end_if_job_finished()

    def _end(self, code: int, reason: str) -> None:
        """exit_with_job: stop this sidecar with `code` (the first reason wins)."""
        if self.result is None:
            self.result = (code, reason)
            (self.log.info if code == 0 else self.log.error)("sidecar_ending", exit_code=code, reason=reason)
        self.stopping.set()

    async def _end_if_job_finished(self) -> None:
        if (
            self.cfg.exit_with_job
            and not self.stopping.is_set()
            and not self._ranked()
            and await self.registry.job_finished()
        ):
            self._end(0, "every rank of the job finished")

    async def _tail(self, w: Worker, stream: asyncio.StreamReader, name: str) -> None:
        with w.log_path.open("ab") as f:
            while True:
                raw = await stream.readline()
                if not raw:
                    return
                f.write(raw)
                f.flush()
                line = raw.decode(errors="replace").rstrip()
                hint = prefilter(line)
                if hint and w.bucket.allow(time.monotonic()) and not self.stopping.is_set():
                    await self.producer.publish(
                        LogEvent(
                            job_id=self.s.job_id,
                            generation=self.gate.generation,
                            producer=f"sidecar-{self.node_id}",
                            node_id=self.node_id,
                            rank=w.rank,
                            stream=name,
                            line=line[:2000],
                            hint=hint,
                        ),
                        wait=True,
                    )

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker: Worker | None = None
        try:
            while raw := await reader.readline():
                try:
                    msg = ch.decode(raw)
                except ch.UnknownMessage as exc:
                    self.log.warning("bad_channel_line", error=str(exc)[:200])
                    continue
                if isinstance(msg, ch.Hello):
                    worker = self.workers.get(msg.pid)
                    if worker is None:
                        self.log.warning("unknown_worker_hello", pid=msg.pid)
                        continue
                    worker.writer = writer  # still STARTING: running means a first step committed
                    async with self.hello:
                        self.hello.notify_all()
                    # A replace may be waiting for this standby while every other worker is
                    # paused and silent: nothing else would wake it.
                    async with self.events:
                        self.events.notify_all()
                elif worker is not None:
                    self._on_report(worker, msg)
                    async with self.events:
                        self.events.notify_all()
        finally:
            writer.close()

    def _on_report(self, w: Worker, msg) -> None:
        now = time.monotonic()
        if isinstance(msg, ch.Step):
            if msg.step != w.step:
                w.last_progress = now
                w.steps_since_recovery += 1
            w.step, w.step_time_s, w.long_phase = msg.step, msg.step_time_s, None
            if w.state not in (RankState.PAUSED, RankState.RECOVERING):
                w.state = RankState.RUNNING
            elif "resumed" in w.progress:
                w.state = RankState.RUNNING
        elif isinstance(msg, ch.LongPhase):
            w.long_phase, w.long_phase_expected_s, w.last_progress = msg.name, msg.expected_s, now
        elif isinstance(msg, ch.Paused):
            # A pause abandons the step in flight, and with it a phase the rank declared in it
            # (its first step's, say): the resumed rank is judged by the plain hang rule.
            w.paused, w.state, w.long_phase = msg, RankState.PAUSED, None
            w.step = msg.applied_step
        elif isinstance(msg, ch.Progress):
            if msg.generation == self.gate.generation:
                w.progress.add(msg.phase)
                w.progress_msgs.append(msg)
                w.last_progress = now
                if msg.phase == "resumed":
                    w.state = RankState.RUNNING
        elif isinstance(msg, ch.Done):
            # Not stopped yet: a rank killed in the last step still needs a replica to copy
            # from. Finished ranks leave together once every rank of the job has finished.
            w.state, w.step = RankState.DONE, msg.step
            self._spawn(self._finished(w, msg.step))
        elif isinstance(msg, ch.Error):
            self.log.warning("worker_error", rank=w.rank, message=msg.message[:500])
            if w.state == RankState.RECOVERING:
                # A recover step failed in the worker (e.g. a restored state failing its
                # digest check): _recover acks the failed stage now, not at the phase timeout.
                w.recover_error = msg.message[:500]

    async def _finished(self, w: Worker, step: int) -> None:
        try:
            n, world = await self.registry.mark_finished(w.rank, step)
        except Exception as exc:  # noqa: BLE001 - retried by the heartbeat loop's check
            self.log.warning("mark_finished_failed", rank=w.rank, error=repr(exc))
            return
        self.log.info("rank_finished", rank=w.rank, step=step, finished=n, world_size=world)
        if world and n >= world:
            await self._stop_finished()

    def _finished_waiting(self) -> list[Worker]:
        """Finished workers still up as replicas (not told to stop yet)."""
        return [
            w
            for w in self.workers.values()
            if w.state == RankState.DONE and not w.expected_exit and w.proc.returncode is None
        ]

    async def _stop_finished(self) -> None:
        """Stop this node's finished workers (idempotent: a stopped one is skipped)."""
        for w in self._finished_waiting():
            w.expected_exit = True
            await self._send(w, ch.Stop())

    async def _stop_if_job_finished(self) -> None:
        if self._finished_waiting() and await self.registry.job_finished():
            self.log.info("job_finished")
            await self._stop_finished()

    async def _send(self, w: Worker, msg) -> bool:
        if w.writer is None or w.proc.returncode is not None:
            return False
        try:
            w.writer.write(ch.encode(msg))
            await w.writer.drain()
            return True
        except (ConnectionError, RuntimeError):
            return False

    async def _wait_for(self, predicate, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                async with self.events:
                    await self.events.wait_for(predicate)
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ heartbeats
    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._heartbeat()
                # The other nodes' ranks finish on their own time: look once per beat.
                await self._stop_if_job_finished()
                await self._end_if_job_finished()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not end the beats
                self.log.warning("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    async def _heartbeat(self) -> None:
        now = time.monotonic()
        ranks = tuple(
            RankStatus(
                rank=w.rank,
                local_rank=w.local_rank,
                pid=w.pid,
                state=w.state,
                step=w.step,
                step_time_s=w.step_time_s,
                generation=self.gate.generation,
                long_phase=w.long_phase,
                long_phase_expected_s=w.long_phase_expected_s,
                since_progress_s=round(now - w.last_progress, 3),
                proc_state=proc_state(w.pid),
            )
            for w in sorted(self.workers.values(), key=lambda w: (w.rank is None, w.rank or 0))
            if w.proc.returncode is None
        )
        role = NodeRole.SPARE if self.cfg.role == "spare" and not self._ranked() else NodeRole.ACTIVE
        # Taken before the await: a beat sent out of turn (an unanswered pause) and the loop's
        # beat must not share a seq, or the detector drops the second as a duplicate.
        seq, self.seq = self.seq, self.seq + 1
        await self.producer.publish(
            NodeHeartbeat(
                job_id=self.s.job_id,
                generation=self.gate.generation,
                producer=f"sidecar-{self.node_id}",
                node_id=self.node_id,
                role=role,
                seq=seq,
                interval_s=self.cfg.heartbeat_interval_s,
                standby_ready=sum(1 for w in self._standbys() if w.writer),
                **({"rank_columns": RankColumns.of(ranks)} if self.cfg.rank_columns else {"ranks": ranks}),
            )
        )
        await self.registry.heartbeat_liveness("sidecar", self.node_id, ttl_s=5)
        M.HEARTBEATS_SENT.labels(self.node_id).inc()
        M.STANDBYS_READY.labels(self.node_id).set(sum(1 for w in self._standbys() if w.writer))
        steps = [r.step for r in ranks if r.rank is not None]  # standbys hold no rank
        if steps:
            M.COMMITTED_STEP.labels(self.node_id).set(min(steps))

    # ------------------------------------------------------------------ commands
    async def _registry_view(self) -> RegistryView | None:
        """The registry's generation, world size and newest executor fence token (one round
        trip), or None when Redis does not answer within 2 s."""
        reg = self.registry
        try:
            gen, world, fence = await asyncio.wait_for(reg.command_view(), 2.0)
        except Exception as exc:  # noqa: BLE001 - unreachable: nothing is acted on unchecked
            self.log.warning("registry_view_failed", error=repr(exc)[:300])
            return None
        if gen is None or world is None:
            return None
        return RegistryView(gen, world, fence)

    async def on_command(self, cmd: ExecutorCommand, record) -> None:
        if cmd.job_id != self.s.job_id:
            return
        if (cmd.nodes is None or self.node_id in cmd.nodes) and cmd.command_id not in self.gate.handled:
            why = command_refusal(cmd, await self._registry_view())
            if why is not None:
                # Never acked: a negative ack under a real command's id would fail its phase.
                self.gate.refused_commands += 1
                self.log.warning(
                    "command_refused",
                    command_id=cmd.command_id[:100],
                    action=cmd.action,
                    generation=cmd.generation,
                    reason=why,
                    refused=self.gate.refused_commands,
                )
                return
        verdict, reason = self.gate.decide(cmd)
        if verdict == "ignore":
            if "stale" in reason:
                self.log.info(
                    "command_ignored",
                    command_id=cmd.command_id,
                    action=cmd.action,
                    reason=reason,
                    fence_token=cmd.fence_token,
                    refused_tokens=self.gate.refused_tokens,
                )
            return
        if verdict == "replay":
            for ack in self.gate.handled[cmd.command_id]:
                await self.producer.publish(ack, wait=True)
            return
        self.gate.handled[cmd.command_id] = []
        self.gate.generation = max(self.gate.generation, cmd.generation)
        self.log.info(
            "command", command_id=cmd.command_id, action=cmd.action, generation=cmd.generation, plan_id=cmd.plan_id
        )
        handler = {
            CommandAction.PAUSE: self._pause,
            CommandAction.REPLACE: self._replace,
            CommandAction.RECOVER: self._recover,
            CommandAction.STOP: self._stop,
        }[cmd.action]
        # Recovery stages arrive over seconds: do not hold the command stream meanwhile.
        task = self._spawn(handler(cmd))
        if cmd.action is CommandAction.PAUSE:
            self._pausing = task

    async def _ack(
        self,
        cmd: ExecutorCommand,
        stage: str = "done",
        ok: bool = True,
        detail: str = "",
        ranks: tuple[RankReport, ...] = (),
    ) -> None:
        ack = CommandAck(
            job_id=self.s.job_id,
            generation=cmd.generation,
            producer=f"sidecar-{self.node_id}",
            command_id=cmd.command_id,
            plan_id=cmd.plan_id,
            incident_id=cmd.incident_id,
            action=cmd.action,
            node_id=self.node_id,
            ok=ok,
            stage=stage,
            detail=detail,
            **({"report_columns": ReportColumns.of(ranks)} if self.cfg.rank_columns and ranks else {"ranks": ranks}),
        )
        self.gate.handled.setdefault(cmd.command_id, []).append(ack)
        await self.producer.publish(ack, wait=True)

    async def _kill(self, ranks: set[int]) -> list[Worker]:
        # Never a process that became its rank in the current generation: that is the
        # replacement, and a retried PAUSE / REPLACE (a new command id) must not kill it.
        old = ranks_to_kill(ranks, self.gate.generation, [(w.rank, w.assigned_at) for w in self._ranked()])
        killed = [w for w in self._ranked() if w.rank in old]
        for w in killed:
            w.expected_exit = True
            try:
                os.kill(w.pid, signal.SIGKILL)  # ours, by PID; a stopped process dies too
            except ProcessLookupError:
                pass
        for w in killed:  # gone before anyone reuses the rank's identity on this node
            try:
                await asyncio.wait_for(w.proc.wait(), 10)
            except TimeoutError:
                self.log.error("kill_timeout", rank=w.rank, pid=w.pid)
        return killed

    async def _pause(self, cmd: ExecutorCommand) -> None:
        await self._kill(set(cmd.kill_ranks))
        targets = [w for w in self._ranked() if w.rank not in set(cmd.kill_ranks)]
        for w in targets:
            w.paused, w.progress, w.progress_msgs, w.steps_since_recovery = None, set(), [], 0
            if w.state is not RankState.HUNG:  # hung stays hung until the new plan kills it
                w.state = RankState.PAUSED
            await self._send(w, ch.Pause(generation=cmd.generation))
        ok = await self._wait_for(
            lambda: all(w.paused is not None or w.proc.returncode is not None for w in targets),
            self.cfg.pause_timeout_s,
        )
        reports = tuple(
            RankReport(
                rank=w.rank,
                pid=w.pid,
                applied_step=w.paused.applied_step,
                grads_step=w.paused.grads_step,
                vote_step=w.paused.vote_step,
            )
            for w in targets
            if w.paused is not None
        )
        missing = [w.rank for w in targets if w.paused is None]
        # The replaced ranks' last step reports: not used by the commit rule (they are in the
        # restart set), only to judge whether the recovery lost a step they had applied.
        replaced = set(cmd.kill_ranks)
        reports += tuple(
            RankReport(rank=w.rank, pid=w.pid, applied_step=w.step)
            for w in self.workers.values()
            if w.rank in replaced and w.proc.returncode is not None
        )
        silent = [w for w in targets if w.paused is None and w.proc.returncode is None]
        if silent:
            # A survivor that does not answer a pause in time is hung (commit-protocol.md): say
            # so in a beat sent now, so the detector raises a hang naming it and the superseding
            # plan kills it by PID and restarts it. The ack below still reports it missing.
            for w in silent:
                w.state = RankState.HUNG
            self.log.error(
                "pause_unanswered",
                ranks=[w.rank for w in silent],
                pids=[w.pid for w in silent],
                generation=cmd.generation,
                timeout_s=self.cfg.pause_timeout_s,
            )
            try:
                await self._heartbeat()
            except Exception as exc:  # noqa: BLE001 - the loop's next beat carries it too
                self.log.warning("heartbeat_failed", error=repr(exc))
        if not ok or missing or reports_stages(cmd, self.node_id):
            await self._ack(
                cmd,
                ok=ok and not missing,
                ranks=reports,
                detail=f"no pause report from ranks {missing}" if missing else "",
            )

    async def _replace(self, cmd: ExecutorCommand) -> None:
        await self._kill(set(cmd.kill_ranks))
        mine = [a for a in cmd.assignments if a.node_id == self.node_id]
        reports = []
        for a in mine:
            existing = next((w for w in self._ranked() if w.rank == a.rank), None)
            if existing is None and not any(w.writer for w in self._standbys()):
                # a cold start: nothing pre-started on this node
                await self._launch(a.local_rank, None)
                await self._wait_for(lambda: any(w.writer for w in self._standbys()), 120)
                # a retry of this command may have assigned the rank while this one waited
                existing = next((w for w in self._ranked() if w.rank == a.rank), None)
            if existing is not None:  # replayed after a takeover, or done by a retry: done
                reports.append(RankReport(rank=a.rank, pid=existing.pid))
                continue
            ready = [w for w in self._standbys() if w.writer is not None]
            if not ready:
                await self._ack(cmd, ok=False, detail=f"no standby for rank {a.rank}")
                return
            w = ready[0]
            w.rank, w.local_rank, w.standby, w.state = a.rank, a.local_rank, False, RankState.RECOVERING
            w.generation = w.assigned_at = cmd.generation
            await self._send(w, ch.Assign(rank=a.rank, local_rank=a.local_rank, node_id=self.node_id))
            reports.append(RankReport(rank=a.rank, pid=w.pid))
            self.log.info("standby_assigned", rank=a.rank, pid=w.pid)
        await self._ack(cmd, ranks=tuple(reports))
        self._spawn(self._refill_standbys())

    async def _recover(self, cmd: ExecutorCommand) -> None:
        # An in-band recovery does not wait for this node's pause report: its RECOVER may come
        # while the pause still runs here. The ranks must see pause before recover.
        if self._pausing is not None and not self._pausing.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._pausing), self.cfg.pause_timeout_s + 5)
        targets = self._ranked()
        lost = lost_before_recover(
            cmd.generation,
            (t.dst for t in cmd.transfers),
            (
                WorkerFate(
                    w.rank,
                    w.proc.returncode is None,
                    not w.expected_exit and w.state != RankState.DONE,
                    w.exited_in_generation,
                )
                for w in self.workers.values()
            ),
        )
        if lost:
            why = f"ranks {lost} died during this recovery: this node cannot rebuild without them"
            self.log.warning("recover_stage_failed", stage="rebuilt", command_id=cmd.command_id, reason=why)
            await self._ack(cmd, stage="rebuilt", ok=False, detail=why)
            return
        if not targets:
            return
        ranks = [w.rank for w in targets]
        for w in targets:
            w.state, w.recover_error = RankState.RECOVERING, None
            await self._send(
                w,
                ch.Recover(
                    generation=cmd.generation,
                    world_size=cmd.world_size,
                    commit_step=cmd.commit_step,
                    resume_step=cmd.resume_step if cmd.resume_step is not None else 0,
                    transfers=tuple(ch.Transfer(src=t.src, dst=t.dst) for t in cmd.transfers),
                    in_band=cmd.in_band,
                ),
            )
        timeout = self.s.executor.phase_timeout_s

        def failure(stage: str) -> str | None:
            return stage_failure(
                stage,
                ranks,
                {w.rank: w.progress for w in targets},
                {w.rank: w.recover_error for w in targets if w.recover_error},
            )

        for stage in ("rebuilt", "restored", "resumed"):
            progress = {w.rank: w.progress for w in targets}
            ok = await self._wait_for(
                lambda: (
                    stage_reached(stage, ranks, progress)
                    or failure(stage) is not None
                    or any(w.proc.returncode is not None for w in targets)
                ),
                timeout,
            )
            reached = stage_reached(stage, ranks, progress)
            failed = None if reached else failure(stage)
            reports = tuple(
                RankReport(
                    rank=w.rank,
                    pid=w.pid,
                    phase=m.phase,
                    seconds=m.seconds,
                    bytes=m.bytes,
                    digest_ok=m.digest_ok,
                    commit_step=m.commit_step,
                    resume_step=m.resume_step,
                    computed_step=m.computed_step,
                )
                for w in targets
                for m in w.progress_msgs
                if m.phase == stage
            )
            if failed:
                self.log.warning("recover_stage_failed", stage=stage, command_id=cmd.command_id, reason=failed)
            if not reached or reports_stages(cmd, self.node_id):
                await self._ack(
                    cmd,
                    stage=stage,
                    ok=ok and reached,
                    ranks=reports,
                    detail="" if reached else failed or f"ranks did not reach {stage}",
                )
            if not reached:
                return
        resume = decided_resume_step(cmd, [(m.phase, m.resume_step) for w in targets for m in w.progress_msgs])
        # A rank that finished the job right after resuming (the fault was in the last step)
        # has no step left to commit: done at resume - 1 is verified too.
        ok = await self._wait_for(
            lambda: all(w.step >= resume or (w.state == RankState.DONE and w.step >= resume - 1) for w in targets),
            timeout,
        )
        if not ok or reports_stages(cmd, self.node_id):
            await self._ack(
                cmd,
                stage="verified",
                ok=ok,
                ranks=tuple(RankReport(rank=w.rank, pid=w.pid, applied_step=w.step) for w in targets),
            )

    async def _stop(self, cmd: ExecutorCommand) -> None:
        for w in list(self.workers.values()):
            w.expected_exit = True
            await self._send(w, ch.Stop())
        await self._ack(cmd)
        self.stopping.set()


async def main(settings: Settings) -> int:
    """Run one sidecar until stopped. -> exit code: 0 when stopped (signal, STOP command); with
    exit_with_job, 0 when the job finished, 1 when one of its workers failed beyond repair and
    128 + the signal when a signal stopped it first."""
    M.serve(settings.metrics_port, settings.metrics_host)
    svc = SidecarService(settings)
    loop = asyncio.get_running_loop()
    got: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (got.append(s), svc.stopping.set()))
    try:
        await svc.run()
    finally:
        svc.stopping.set()
        await svc.close()
    if svc.result is not None:
        return svc.result[0]
    return 128 + got[0] if got and settings.sidecar.exit_with_job else 0
