"""RecoveryAgent: runs inside every training process and keeps it alive through failures elsewhere.

Use in a training loop (see agent/reference/train.py)::

    agent = RecoveryAgent.from_env(tp=2)
    agent.attach(model, optimizer, scheduler=sched, before_apply=clip)  # the state it moves
    step = agent.start()                         # hello; standby: wait for assign + recover
    while step <= total_steps:
        try:
            agent.begin_step(step)               # zero grads (+ fault hook)
            loss_fn(step).backward()             # tp collectives go through agent.comm
            agent.sync_gradients()               # one flat dp allreduce
            step = agent.commit()                # vote, optimizer.step(), step report
        except Exception as exc:
            step = agent.recover(exc)            # re-raises anything that is not an interrupt
    agent.finish(digest)

Threads: the main thread trains; a control thread reads the sidecar socket. On ``pause`` the
control thread interrupts the main thread's collective wait (see groups.Interruptor); the main
thread drops the partial step, reports ``paused`` and waits for ``recover``.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import structlog
import torch
import torch.distributed as dist

from ..shared import channel as ch
from ..shared.commit_rule import InBandDecision, InconsistentReports, decide_in_band, in_band_row
from ..shared.replicas import tp_shard
from .faults import FaultInjector, parse_faults
from .gradients import flatten_grads, unflatten_into_grads
from .groups import (
    CollectiveError,
    Comm,
    GlooGroupFactory,
    GroupFactory,
    Groups,
    Interrupted,
    Interruptor,
    NcclGroupFactory,
    PauseRequested,
    arrival_barrier,
    first_line,
    gloo_loop_threads,
    print_failure,
)
from .settings import AgentSettings
from .transfer import Stateful, TrainingState, TransferError, TransferResult, recv_state, send_state


class AgentExit(SystemExit):
    """The sidecar said stop while the rank was paused."""


def _make_logger(rank: Any) -> Any:
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "event"]),
        ],
    ).bind(component="flashrecovery.agent", rank=rank)


class RecoveryAgent:
    def __init__(self, settings: AgentSettings, tp: int = 1, factory: GroupFactory | None = None) -> None:
        self.settings = settings
        self.tp = tp
        self.rank: int | None = settings.rank
        self.local_rank = settings.local_rank
        self.node_id = settings.node_id
        self.world_size = settings.world_size
        self.generation = settings.generation
        self.standby = settings.standby
        if factory is None:
            if settings.backend == "nccl":
                factory = NcclGroupFactory()
            else:
                factory = GlooGroupFactory(lazy_init=settings.gloo_lazy, connect_timeout_s=settings.rebuild_timeout_s)
        self.factory = factory
        self.interruptor = Interruptor()
        self.comm = Comm(self.interruptor)
        self.groups: Groups | None = None
        self.store: dist.Store | None = None
        self.conn: ch.Connection | None = None
        self.faults = FaultInjector(parse_faults(settings.fault), settings.generation)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.before_apply: Callable[[int], None] | None = None
        self.state: TrainingState | None = None
        # commit-protocol state (steps counted from 1; 0 = none)
        self.applied_step = 0
        self.grads_step: int | None = None
        self.vote_step = 0
        self._step: int | None = None
        self._applying: int | None = None  # step whose optimizer update is under way
        self._orphan_builds: list[threading.Thread] = []  # group builds a pause abandoned
        self._t_step = 0.0
        self._first_step_pending = False  # the job's first step, declared when it begins
        self._cmds: queue.Queue[ch.Message | None] = queue.Queue()
        self._pause_gen = -1  # newest generation a pause named (set by the reader thread)
        self.barrier_polls = 0
        self._reader: threading.Thread | None = None
        self.log = _make_logger(self.rank)
        self.recoveries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_env(cls, tp: int = 1, **kw: Any) -> RecoveryAgent:
        return cls(AgentSettings(), tp=tp, **kw)

    def attach(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any = None,
        before_apply: Callable[[int], None] | None = None,
        stateful: Mapping[str, Stateful] | None = None,
    ) -> None:
        """Register the training state (transfer.TrainingState: what a replaced rank receives).

        ``scheduler``: an LR scheduler the agent steps once after every optimizer step it
        applies (in ``commit`` and in a recovery's commit step); moved as stateful "scheduler".
        ``before_apply(step)``: runs on the reduced gradients right before every optimizer step
        the agent applies (gradient clipping, statistics buffers), so exactly once per step.
        ``stateful``: more objects with state_dict()/load_state_dict() (a grad scaler, ...).
        """
        objs = dict(stateful or {})
        if scheduler is not None:
            if "scheduler" in objs:
                raise ValueError("stateful name 'scheduler' is taken by the scheduler argument")
            objs["scheduler"] = scheduler
        self.model, self.optimizer = model, optimizer
        self.scheduler, self.before_apply = scheduler, before_apply
        self.state = TrainingState(model, optimizer, objs)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        assert self.model is not None, "attach(model, optimizer) first"
        return list(self.model.parameters())

    def start(self) -> int:
        """Connect to the sidecar and the store, build groups; returns the first step to run."""
        self._connect()
        if self._awaits_state():
            # a standby, or a replacement cold-started into generation g > 0: it has no state
            # yet, so it waits for `recover` (and receives its state there)
            return self._standby_wait()
        assert self.rank is not None, "FLASHRECOVERY_AGENT_RANK is required for a non-standby worker"
        self._build_first_groups()
        self.log.info(
            "started",
            generation=self.generation,
            world_size=self.world_size,
            build_s=round(self.groups.build_s, 4) if self.groups else None,
        )
        return self.applied_step + 1

    def _connect(self) -> None:
        """Sidecar socket (commands), rendezvous store, hello."""
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 pid`: stacks
        self.interruptor.compute.install(self.settings.interrupt_signal)
        if self.settings.socket:
            self.conn = ch.Connection.connect(self.settings.socket)
            self._reader = threading.Thread(target=self._read_loop, name="flashrecovery-control", daemon=True)
            self._reader.start()
            self._install_excepthook()
        self.store = dist.TCPStore(
            self.settings.rdzv_host, self.settings.rdzv_port, is_master=False, timeout=datetime.timedelta(seconds=300)
        )
        self._send(
            ch.Hello(
                pid=os.getpid(),
                rank=None if self.standby else self.rank,
                local_rank=self.local_rank,
                standby=self.standby,
            )
        )

    def _awaits_state(self) -> bool:
        return self.standby or (self.generation > 0 and self.conn is not None)

    def _on_assign(self, cmd: ch.Assign) -> None:
        self.rank, self.local_rank, self.node_id = cmd.rank, cmd.local_rank, cmd.node_id
        self.log = _make_logger(self.rank)
        self.log.info("assigned", node_id=cmd.node_id, local_rank=cmd.local_rank)

    def _standby_wait(self) -> int:
        self.log.info("standby waiting for assign")
        while True:
            # Unassigned, a standby waits with no deadline (seen: every standby of the spare died
            # "no command from the sidecar for 600 s" 10 minutes into a fault-free run).
            cmd = self._next_cmd(bounded=self.rank is not None)
            if isinstance(cmd, ch.Assign):
                self._on_assign(cmd)
            elif isinstance(cmd, ch.Pause) and self.rank is not None:
                # Assigned but not recovered yet, and a superseding plan pauses everyone: say
                # so (no state held: applied 0), or that plan's pause waits for us until it fails.
                self.log.info("paused while assigned", generation=cmd.generation)
                self._send_paused()
            elif isinstance(cmd, ch.Recover) and self.rank is not None:
                self.standby = False
                self.faults = FaultInjector([], cmd.generation)
                self.generation = min(self.generation, cmd.generation - 1)
                return self._recover_loop(first=cmd)
            elif isinstance(cmd, ch.Stop):
                self.close()
                raise AgentExit(0)

    def _build_first_groups(self) -> None:
        """Generation 0's groups for a rank that starts the job; its first step is declared."""
        self._build_groups(arrival_timeout_s=self.settings.start_timeout_s)
        self._first_step_pending = True

    def _build_groups(self, arrival_timeout_s: float | None = None) -> None:
        """Build this generation's groups. The gloo constructor waits in the store (holding the
        GIL) until every member registered, so it is bounded by ``rebuild_timeout_s``; a member
        that never comes turns into a CollectiveError: the rank pauses again. The arrival wait
        before it may be longer at the job's start (``arrival_timeout_s``): ranks start over
        seconds while torch imports, and no recovery is waiting on them."""
        assert self.store is not None and self.rank is not None
        self.store.set_timeout(datetime.timedelta(seconds=self.settings.rebuild_timeout_s))
        arrived = f"flashrecovery/{self.settings.job_id}/g{self.generation}/arrived"
        self.barrier_polls = arrival_barrier(
            self.store,
            arrived,
            self.world_size,
            self._abandon_rebuild,
            arrival_timeout_s or self.settings.rebuild_timeout_s,
        )
        try:
            self.groups = self._build_interruptibly()
        except RuntimeError as exc:  # store timeout, connect failure
            print_failure(self.rank, f"building generation {self.generation}", exc)
            raise CollectiveError(f"group build g{self.generation}: {first_line(exc)}") from exc
        self.comm.groups = self.groups

    def _build_interruptibly(self) -> Groups:
        """The gloo constructors on a helper thread, the main thread waiting on it so that a
        pause of a newer generation abandons the build at once. Measured (bench/scenarios.py,
        a second crash 0.15 s into a rebuild): members whose peer died after the arrival
        barrier waited in cascaded per-pair connect timeouts for 75 s, past the sidecar's pause
        deadline, and every survivor was then declared hung. The constructors release the GIL
        while they wait, so the control thread and this loop keep running."""
        done = threading.Event()
        abandoned = threading.Event()
        out: dict[str, Any] = {}
        args = (self.store, self.settings.job_id, self.generation, self.rank, self.world_size, self.tp)

        def build() -> None:
            try:
                out["groups"] = self.factory.build(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting main thread
                out["error"] = exc
            finally:
                done.set()
                if abandoned.is_set() and "groups" in out:  # formed after all: nobody uses it
                    self.factory.abort(out["groups"], [])

        worker = threading.Thread(target=build, name="flashrecovery-build", daemon=True)
        worker.start()
        while not done.wait(0.01):
            why = self._abandon_rebuild()
            if why is not None:
                abandoned.set()
                self._orphan_builds.append(worker)
                raise PauseRequested(f"rebuild abandoned while connecting: {why}")
        if "error" in out:
            raise out["error"]
        return out["groups"]

    def _abandon_rebuild(self) -> str | None:
        # A pause of a newer generation may have arrived before this rebuild cleared the
        # interruptor; the generation it names still tells that this rebuild is superseded.
        if self._pause_gen > self.generation:
            return f"pause g{self._pause_gen} while rebuilding g{self.generation}"
        return self.interruptor.reason

    # ------------------------------------------------------------------ the step
    def begin_step(self, step: int) -> None:
        self.interruptor.check()
        if step != self.applied_step + 1:
            raise RuntimeError(f"step {step} after applied step {self.applied_step}")
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=False)
        self._start_step(step)

    def _start_step(self, step: int) -> None:
        """What every step's start records, whichever loop drives it (managed.py too)."""
        self._step = step
        self._t_step = time.perf_counter()
        self.grads_step = None  # the reduced gradients of the previous step are gone
        if self._first_step_pending:
            self._declare_first_step()
        if self.factory.buried():
            self._reap_between_steps(step)
        self.faults.maybe(self.rank, step, "forward")

    def _declare_first_step(self) -> None:
        """The rank is `starting` until it commits a step, and the detector judges a starting
        rank only inside a declared phase (before it, the torch import and the arrival barrier
        are bounded by ``start_timeout_s``), so the first step is declared as a long phase of
        ``first_step_s``: a first step that hangs is then reported like any hang instead of
        waiting for the collective timeout. Only a rank that starts the job declares it; a
        replacement, and every rank after a recovery, resumes under the recovery's deadlines."""
        self._first_step_pending = False
        self.long_phase(ch.FIRST_STEP_PHASE, self.settings.first_step_s)

    def _reap_between_steps(self, step: int) -> None:
        """A generation's abandoned collective may end (its peer's socket closes) only after the
        recovery that buried it; reaped only at the next recovery, it kept its threads, memory
        and sockets for a whole fault interval (traced: +6 threads in every survivor between
        faults), and a device loop thread with unread bytes spins (GlooGroupFactory.reap). So
        the graveyard is checked at every step start while it holds anything."""
        reaped = self.factory.reap()
        if reaped:
            self.log.info("reaped", step=step, generations=reaped, still_buried=self.factory.buried())

    def compute(self) -> AbstractContextManager[None]:
        """``with agent.compute():`` around the step's forward and backward (anything before the
        gradient sync that only computes): a pause then ends it at once with PauseRequested,
        handled by ``recover`` like any interrupt, instead of waiting for the step's next
        collective. Only for code whose partial work a pause may throw away (agent/compute.py);
        the agent's own collectives inside it are never cut."""
        return self.interruptor.compute.region()

    def sync_gradients(self) -> None:
        """Flatten all grads into one buffer, one dp allreduce, divide by dp size."""
        step = self._step
        params = self.params
        grads, flat = flatten_grads(params)
        work = self.comm.dp_allreduce_async(flat)
        self.faults.maybe(self.rank, step, "grad_sync")
        if work is not None:
            self.interruptor.wait(work, "dp allreduce (gradient sync)", self.rank)
            flat.div_(self.groups.dp)
        unflatten_into_grads(params, grads, flat)
        self.grads_step = step
        self.faults.maybe(self.rank, step, "after_sync")

    def commit(self) -> int:
        """Commit vote over the global group, then apply the update. Returns the next step."""
        step = self._step
        assert step is not None and self.grads_step == step, "sync_gradients() first"
        vote = torch.ones(1)
        pg = self.groups.global_pg if self.groups else None
        if pg is not None and pg.size() > 1:
            work = pg.allreduce([vote])
            self.faults.maybe(self.rank, step, "vote")
            self.interruptor.wait(work, "commit vote allreduce", self.rank)
        else:
            self.faults.maybe(self.rank, step, "vote")
        if int(vote.item()) != self.world_size:
            raise RuntimeError(f"commit vote of step {step}: {vote.item()} of {self.world_size}")
        self.vote_step = step
        self.faults.maybe(self.rank, step, "optimizer")
        self._apply(step)
        self._send(
            ch.Step(
                rank=self.rank,
                step=step,
                step_time_s=round(time.perf_counter() - self._t_step, 6),
                generation=self.generation,
            )
        )
        self._step = None
        return step + 1

    def _apply(self, step: int) -> None:
        assert self.optimizer is not None
        # While this is set the rank's state is torn: an exception here leaves some tensors
        # updated and others not, so the rank can no longer serve as a survivor (recover()).
        if self.before_apply is not None:
            self.before_apply(step)  # gradients only (clipping): still a clean pause if it fails
        self._applying = step
        self._optimizer_step()
        if self.scheduler is not None:
            self._scheduler_step()
        self._applying = None
        self.applied_step = step

    def _optimizer_step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()

    def _scheduler_step(self) -> None:
        self.scheduler.step()

    def long_phase(self, name: str, expected_s: float) -> None:
        self._send(ch.LongPhase(rank=self.rank, name=name, expected_s=expected_s))

    # ------------------------------------------------------------------ recovery
    def recover(self, exc: BaseException) -> int:
        """Handle an interrupted step: report paused, wait for recover, rebuild, resume.

        Returns the step to compute next. Re-raises ``exc`` if it is not an interrupt, and
        whenever it was raised inside the optimizer update: that rank's state is then unknown,
        so it must leave and be replaced from a replica, never pause as a survivor of step k+1.
        """
        self._first_step_pending = False
        if self._applying is not None:
            self.log.error("torn optimizer step: leaving to be replaced", step=self._applying, error=repr(exc))
            raise exc
        if not isinstance(exc, Interrupted):
            if not self.interruptor.interrupted:
                raise exc
            exc = PauseRequested(f"{self.interruptor.reason} (while: {exc!r})")
        return self._recover_loop(exc=exc)

    def _enter_paused(self, why: str) -> None:
        if self.groups is not None:
            self.factory.abort(self.groups, self.interruptor.take_abandoned())
            self.groups = None
            self.comm.groups = None
        self._step = None
        self.log.info(
            "paused",
            why=why,
            generation=self.generation,
            applied_step=self.applied_step,
            grads_step=self.grads_step,
            vote_step=self.vote_step,
        )
        self._send_paused()

    def _send_paused(self) -> None:
        self._send(
            ch.Paused(
                rank=self.rank,
                generation=self.generation,
                applied_step=self.applied_step,
                grads_step=self.grads_step,
                vote_step=self.vote_step,
            )
        )

    def _recover_loop(self, exc: BaseException | None = None, first: ch.Recover | None = None) -> int:
        if exc is not None:
            self.interruptor.interrupt(str(exc))  # a self-detected failure also stops this rank
            self._enter_paused(f"{type(exc).__name__}: {exc}")
        cmd: ch.Message | None = first
        while True:
            if cmd is None:
                cmd = self._next_cmd()
            if isinstance(cmd, ch.Pause):
                self._send_paused()
            elif isinstance(cmd, ch.Stop):
                self.log.info("stop while paused")
                self.close()  # leaves with os._exit(0) when old groups may hold stuck threads
                raise AgentExit(0)
            elif isinstance(cmd, ch.Recover):
                if cmd.generation <= self.generation:
                    self.log.info("stale recover dropped", got=cmd.generation, generation=self.generation)
                else:
                    try:
                        return self._do_recover(cmd)
                    except Interrupted as again:
                        self.interruptor.interrupt(str(again))
                        self._enter_paused(f"during recovery: {again}")
                    except _RecoveryFailed as bad:
                        self._send(ch.Error(rank=self.rank, message=str(bad)))
                        self.interruptor.interrupt(str(bad))
                        self._enter_paused(f"recovery failed: {bad}")
            cmd = None

    def _do_recover(self, cmd: ch.Recover) -> int:
        t0 = time.perf_counter()
        self.generation = cmd.generation  # from now on, pauses of older generations are stale
        self.world_size = cmd.world_size
        # A pause of a newer generation that came in meanwhile survives this and abandons the
        # rebuild at the arrival barrier: the rank pauses again instead of training on.
        self.interruptor.clear(cmd.generation)
        self._build_groups()
        receiving = [t for t in cmd.transfers if t.dst == self.rank]
        sending = [t for t in cmd.transfers if t.src == self.rank]
        decided = self._rebuild_check(cmd, restarting=bool(receiving))
        if decided is not None:
            cmd = cmd.model_copy(
                update={"commit_step": decided.decision.commit_step, "resume_step": decided.decision.resume_step}
            )
        t_rebuilt = time.perf_counter()
        self._send(
            ch.Progress(
                rank=self.rank,
                generation=self.generation,
                phase="rebuilt",
                seconds=round(t_rebuilt - t0, 6),
                **(
                    {}
                    if decided is None
                    else {
                        "commit_step": decided.decision.commit_step,
                        "resume_step": decided.decision.resume_step,
                        "computed_step": decided.computed_step,
                    }
                ),
            )
        )
        record: dict[str, Any] = {
            "generation": self.generation,
            "rebuild_s": t_rebuilt - t0,
            "build_s": self.groups.build_s,
        }
        if cmd.commit_step is not None and not receiving and self.applied_step < cmd.commit_step:
            if self.applied_step != cmd.commit_step - 1 or self.grads_step != cmd.commit_step:
                raise _RecoveryFailed(
                    f"cannot commit step {cmd.commit_step}: applied {self.applied_step}, "
                    f"holding gradients of {self.grads_step}"
                )
            self._apply(cmd.commit_step)
            self.vote_step = cmd.commit_step
            self.log.info("committed in recovery", step=cmd.commit_step)
        self._before_transfers()
        results: list[TransferResult] = []
        assert self.state is not None, "attach(model, optimizer) first"
        for t in sending:
            try:
                results.append(
                    send_state(
                        self.comm,
                        t.dst,
                        self.state,
                        self.applied_step,
                        window_bytes=self.settings.transfer_window_bytes,
                    )
                )
            except TransferError as exc:  # a state_dict value the wire format cannot carry
                raise _RecoveryFailed(f"state to rank {t.dst}: {exc}") from exc
        digest_ok: bool | None = None
        for t in receiving:
            if tp_shard(t.src, self.tp) != tp_shard(self.rank, self.tp):
                # Same shapes, another shard's values: nothing downstream would notice.
                raise _RecoveryFailed(
                    f"state source rank {t.src} holds tp shard {tp_shard(t.src, self.tp)}, "
                    f"rank {self.rank} is shard {tp_shard(self.rank, self.tp)} (tp {self.tp}): "
                    "the job's registered tp differs from the script's"
                )
            try:
                res = recv_state(self.comm, t.src, self.state, window_bytes=self.settings.transfer_window_bytes)
            except TransferError as exc:
                raise _RecoveryFailed(f"state from rank {t.src}: {exc}") from exc
            results.append(res)
            digest_ok = bool(res.digest_ok)
            if not res.digest_ok:
                raise _RecoveryFailed(f"state from rank {t.src}: digest mismatch")
            self.applied_step = self.vote_step = res.step
            self.grads_step = None
        nbytes = sum(r.bytes for r in results)
        t_restored = time.perf_counter()
        self._send(
            ch.Progress(
                rank=self.rank,
                generation=self.generation,
                phase="restored",
                seconds=round(t_restored - t_rebuilt, 6),
                bytes=nbytes if results else None,
                digest_ok=digest_ok,
            )
        )
        if self.applied_step != cmd.resume_step - 1:
            raise _RecoveryFailed(f"resume at {cmd.resume_step} but applied {self.applied_step}")
        self._send(
            ch.Progress(
                rank=self.rank, generation=self.generation, phase="resumed", seconds=round(time.perf_counter() - t0, 6)
            )
        )
        t_reap = time.perf_counter()
        reaped = self.factory.reap()
        record.update(
            transfer_s=t_restored - t_rebuilt,
            bytes=nbytes,
            resume_step=cmd.resume_step,
            reaped=reaped,
            reap_s=time.perf_counter() - t_reap,
            gloo_loops=gloo_loop_threads(),
        )
        self.recoveries.append(record)
        self.log.info("resumed", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()})
        return cmd.resume_step

    def _rebuild_check(self, cmd: ch.Recover, restarting: bool) -> InBandDecision | None:
        """The allreduce that proves every member joined the new groups. In an in-band recovery
        it also decides the commit: each survivor adds its counters (a restarted rank the
        neutral row) and every rank reads the same decision off the MAX (commit_rule)."""
        if not cmd.in_band:
            self.comm.global_allreduce(torch.ones(1), "rebuild check allreduce")
            return None
        assert self.rank is not None
        row = in_band_row(self.rank, self.applied_step, self.grads_step, self.vote_step, restarting)
        reduced = self.comm.global_allreduce(
            torch.tensor(row, dtype=torch.int64), "rebuild check and commit decision", op=dist.ReduceOp.MAX
        )
        try:
            decided = decide_in_band(reduced.tolist())
        except InconsistentReports as exc:  # every rank refuses alike: the recovery escalates
            raise _RecoveryFailed(f"commit rule: {exc}") from None
        self.log.info(
            "commit_decision",
            commit_step=decided.decision.commit_step,
            resume_step=decided.decision.resume_step,
            reason=decided.decision.reason,
        )
        return decided

    def _before_transfers(self) -> None:
        """Called in a recovery once the commit step is applied, before any state moves."""

    def finish(self, digest: str) -> None:
        """Report done, then serve as a replica for late recoveries until the sidecar says stop."""
        self._serve_until_stop(digest)
        self.close()

    def _serve_until_stop(self, digest: str) -> None:
        while True:
            self._send(ch.Done(rank=self.rank, step=self.applied_step, digest=digest))
            if self.conn is None:
                break
            try:
                cmd = self._next_cmd()
            except RuntimeError as exc:  # the sidecar went away or never said stop
                self.log.warning("finishing without stop", error=str(exc))
                break
            if isinstance(cmd, ch.Stop):
                break
            if isinstance(cmd, ch.Pause):
                self.interruptor.interrupt(f"pause g{cmd.generation} after done", generation=cmd.generation)
                self._recover_loop(exc=PauseRequested(f"pause g{cmd.generation} after done"))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        sys.stdout.flush()
        sys.stderr.flush()
        if any(t.is_alive() for t in self._orphan_builds) or (
            isinstance(self.factory, GlooGroupFactory) and self.factory.graveyard
        ):
            # Old generations may hold gloo worker threads stuck in abandoned collectives; their
            # destructors would join them at interpreter exit. Leave without running them.
            os._exit(0)

    # ------------------------------------------------------------------ channel plumbing
    def _send(self, msg: ch._Msg) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send(msg)
        except OSError as exc:
            self.log.warning("sidecar send failed", error=repr(exc))

    def _next_cmd(self, bounded: bool = True) -> ch.Message:
        """The sidecar's next command; within command_timeout_s when `bounded` (a paused rank
        waiting for its recover). An unassigned standby waits as long as the job runs: its
        sidecar's channel closing is what ends it."""
        timeout = self.settings.command_timeout_s if bounded else None
        try:
            cmd = self._cmds.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no command from the sidecar for {timeout} s") from None
        if cmd is None:
            raise RuntimeError("sidecar connection closed while waiting for a command")
        return cmd

    def _read_loop(self) -> None:
        assert self.conn is not None
        try:
            for msg in self.conn.messages():
                if isinstance(msg, ch.Pause):
                    if msg.generation < self.generation:
                        self.log.info("stale pause dropped", got=msg.generation, generation=self.generation)
                        continue
                    self._pause_gen = max(self._pause_gen, msg.generation)
                    self.interruptor.interrupt(f"pause g{msg.generation} from sidecar", generation=msg.generation)
                self._cmds.put(msg)
        except (OSError, ValueError) as exc:
            self.log.warning("sidecar channel error", error=repr(exc))
        self._cmds.put(None)

    def _install_excepthook(self) -> None:
        prev = sys.excepthook

        def hook(tp: Any, val: Any, tb: Any) -> None:
            if not isinstance(val, (SystemExit, KeyboardInterrupt)):
                self._send(ch.Error(rank=self.rank, message=f"{tp.__name__}: {val}"))
            prev(tp, val, tb)

        sys.excepthook = hook


class _RecoveryFailed(RuntimeError):
    pass


__all__ = ["RecoveryAgent", "AgentExit", "Interrupted", "CollectiveError", "PauseRequested"]
