"""A whole FlashRecovery deployment on this machine: the stack, the services, one sidecar per
node with real torch workers, a spare node with standbys, and a watcher on every topic.
Used by `flashrecovery run --standalone`, `flashrecovery demo`, the end-to-end tests and the
benchmarks. What the workers run is the caller's business (a WorkerSpec): the demo's reference
job is `demo.reference_cluster`."""

from __future__ import annotations

import asyncio
import glob
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .shared import bus as busmod
from .shared import topics as T
from .shared.registry import Registry
from .shared.schemas import (
    FaultIncident,
    LogEvent,
    NodeHeartbeat,
    RecoveryCompleted,
    RecoveryPlan,
    RecoveryProgress,
    WorkerExit,
)
from .shared.settings import Settings, agent_env
from .shared.topology import grid_topology
from .supervisor import Supervisor, job_address_file, write_job_address

FAULTS = (
    "process-crash",
    "node-crash",
    "sidecar-crash",
    "hang",
    "ecc",
    "exception",
    "kill-forward",
    "kill-grad-sync",
    "kill-after-sync",
    "kill-vote",
    "kill-optimizer",
    "none",
)


@dataclass
class Timeline:
    """Everything the watcher saw, with the local receive time."""

    heartbeats: dict[str, NodeHeartbeat] = field(default_factory=dict)
    exits: list[WorkerExit] = field(default_factory=list)
    logs: list[LogEvent] = field(default_factory=list)
    incidents: list[FaultIncident] = field(default_factory=list)
    plans: list[RecoveryPlan] = field(default_factory=list)
    progress: list[RecoveryProgress] = field(default_factory=list)
    completed: list[RecoveryCompleted] = field(default_factory=list)
    other: list[Any] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # (receive time, rank, step) each time a heartbeat shows a rank at a higher applied step:
    # what the job had committed at any moment, seen independently of the executor
    step_log: list[tuple[float, int, int]] = field(default_factory=list)
    _top: dict[int, int] = field(default_factory=dict)

    def note_steps(self, hb: NodeHeartbeat, at: float) -> None:
        for r in hb.rank_statuses():
            if r.rank is not None and r.step > self._top.get(r.rank, -1):
                self._top[r.rank] = r.step
                self.step_log.append((at, r.rank, r.step))

    def committed_before(self, t: float) -> int:
        """The highest step every rank had applied by wall time t, as heartbeats received by
        then showed it (a lower bound: heartbeats lag the ranks by up to one interval)."""
        top: dict[int, int] = {}
        for at, rank, step in self.step_log:
            if at <= t:
                top[rank] = max(top.get(rank, -1), step)
        return min(top.values(), default=0)

    def rank_view(self) -> dict[int, tuple[str, Any]]:
        view = {}
        for node, hb in self.heartbeats.items():
            for r in hb.rank_statuses():
                if r.rank is not None:
                    view[r.rank] = (node, r)
        return view


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker runs: `python -m module ARGS` or `python script ARGS`."""

    module: str = ""
    script: str = ""
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.module) == bool(self.script):
            raise ValueError(f"a worker is a module or a script, exactly one (got {self.module!r}, {self.script!r})")

    def sidecar_env(self) -> dict[str, str]:
        # both entry points set, one empty: a value inherited from the caller's environment
        # must not add the other one (the sidecar refuses both)
        return {
            "FLASHRECOVERY_SIDECAR__WORKER_MODULE": self.module,
            "FLASHRECOVERY_SIDECAR__WORKER_SCRIPT": self.script,
            "FLASHRECOVERY_SIDECAR__WORKER_ARGS": shlex.join(self.args),
        }


@dataclass
class LocalCluster:
    """`nodes` x `ranks_per_node` ranks running `worker`, and `spares` spare nodes keeping
    `standbys` standby workers each (default: one per rank of a node)."""

    settings: Settings
    run_dir: Path
    worker: WorkerSpec
    nodes: int = 4
    ranks_per_node: int = 2
    tp: int = 2
    spares: int = 1
    standbys: int | None = None
    node_standbys: int | None = None  # warm standbys of each active node (None: the settings')
    executors: int = 2
    fault_env: str | None = None
    on_event: Any = None
    services: tuple[str, ...] = ("detector", "planner")
    # where the workers write their final states (rank{r}.pt), if they do: finished(), final_states()
    out_dir: Path | None = None
    exit_with_job: bool = False  # sidecars end with the job (flashrecovery run)
    # The nodes are slices of one machine (flashrecovery run --standalone): torchrun's view
    # is one node, GROUP_RANK 0, LOCAL_RANK 0..world-1 across the sidecars.
    one_machine: bool = False
    metrics: bool = False  # every service and sidecar serves Prometheus metrics on a free port
    # kind -> (Kafka user, password file), one principal per kind of process (flashrecovery.secure)
    kafka_principals: dict[str, tuple[str, str]] = field(default_factory=dict)
    redis_urls: dict[str, str] = field(default_factory=dict)  # kind -> its role's Redis URL (secure)
    sup: Supervisor = field(init=False)
    timeline: Timeline = field(default_factory=Timeline)

    def __post_init__(self) -> None:
        self.sup = Supervisor(
            self.settings,
            self.run_dir,
            metrics=self.metrics,
            kafka_principals=self.kafka_principals,
            redis_urls=self.redis_urls,
        )
        self.out_dir = self.out_dir or self.run_dir / "final"
        self.world = self.nodes * self.ranks_per_node
        self.standbys = self.ranks_per_node if self.standbys is None else self.standbys

    # ------------------------------------------------------------------ start / stop
    async def start(self, timeout_s: float = 180.0) -> None:
        # Started from this (main) thread on purpose: children die with the thread that started
        # them (PR_SET_PDEATHSIG), and a pool thread may exit before the cluster does.
        self.sup.start_stack(ensure=False)
        await busmod.ensure_topics(self.sup.stack.kafka_bootstrap, self.settings.bus)
        self.sup.start_rendezvous()
        reg = Registry.from_url(self.sup.stack.redis_url, self.settings.job_id)
        try:
            await reg.init_job(
                grid_topology(
                    self.settings.job_id,
                    self.nodes,
                    self.ranks_per_node,
                    self.tp,
                    spares=self.spares,
                    standby_slots=self.standbys,
                )
            )
        finally:
            await reg.close()
        await self._start_watcher()
        names = list(self.services) + [f"executor-{i}" for i in range(self.executors)]
        for service in self.services:
            self.sup.start_service(service)
        for i in range(self.executors):
            self.sup.start_service("executor", f"executor-{i}", FLASHRECOVERY_INSTANCE=str(i))
        # The nodes start only once the services are up: a rank that failed before the
        # detector's consumer joined would go unseen (it reads from the newest record).
        await self.sup.wait_ready(names, timeout_s)
        write_job_address(self.address_file(), self.settings, self.sup, self.run_dir)
        env = {
            "FLASHRECOVERY_SIDECAR__WORLD_SIZE": str(self.world),
            # the job's tensor-parallel degree as registered: the agent checks its own against it
            agent_env("tp"): str(self.tp),
            **self.worker.sidecar_env(),
            "FLASHRECOVERY_SIDECAR__EXIT_WITH_JOB": str(self.exit_with_job).lower(),
            "FLASHRECOVERY_RUNTIME_DIR": str(self.run_dir),  # worker logs beside the services' logs
            # every "node" shares this machine's cores with the control plane
            "FLASHRECOVERY_SIDECAR__WORKER_NICE": os.environ.get("FLASHRECOVERY_SIDECAR__WORKER_NICE", "10"),
        }
        if self.fault_env:
            env[agent_env("fault")] = self.fault_env
        sidecars = []
        if self.one_machine:
            env.update(FLASHRECOVERY_SIDECAR__NODE_RANK="0", FLASHRECOVERY_SIDECAR__LOCAL_WORLD_SIZE=str(self.world))
        for n in range(self.nodes):
            ranks = ",".join(str(r) for r in range(n * self.ranks_per_node, (n + 1) * self.ranks_per_node))
            base = str(n * self.ranks_per_node if self.one_machine else 0)
            self.sup.spawn(
                f"sidecar-node-{n}",
                [sys.executable, "-m", "flashrecovery.sidecar"],
                FLASHRECOVERY_SIDECAR__NODE_ID=f"node-{n}",
                FLASHRECOVERY_SIDECAR__RANKS=ranks,
                FLASHRECOVERY_SIDECAR__ROLE="active",
                FLASHRECOVERY_SIDECAR__LOCAL_RANK_BASE=base,
                FLASHRECOVERY_SIDECAR__CAPACITY=str(self.ranks_per_node),
                **env,
                **({} if self.node_standbys is None else {"FLASHRECOVERY_SIDECAR__STANDBYS": str(self.node_standbys)}),
            )
            sidecars.append(f"node-{n}")
        for s in range(self.spares):
            self.sup.spawn(
                f"sidecar-spare-{s}",
                [sys.executable, "-m", "flashrecovery.sidecar"],
                FLASHRECOVERY_SIDECAR__NODE_ID=f"spare-{s}",
                FLASHRECOVERY_SIDECAR__ROLE="spare",
                FLASHRECOVERY_SIDECAR__CAPACITY=str(self.standbys),
                **env,
            )
            sidecars.append(f"spare-{s}")
        await self.sup.wait_ready(sidecars, timeout_s)
        if self.metrics:  # again, now with the sidecars' metrics endpoints
            write_job_address(self.address_file(), self.settings, self.sup, self.run_dir)

    async def _start_watcher(self) -> None:
        self._producer = busmod.Producer(self.sup.stack.kafka_bootstrap, self.settings.bus, "watcher")
        await self._producer.start()
        self._watcher = busmod.Consumer(
            self.sup.stack.kafka_bootstrap,
            self.settings.bus,
            [t for t in T.ALL if t is not T.DEAD_LETTER],
            None,
            self._seen,
            self._producer,
            "watcher",
            from_latest=True,
            # An onlooker: each topic's consumer dead-letters bad input once; a second copy of
            # every letter under "watcher" would only double the dead-letter topic.
            dead_letters=False,
        )
        await self._watcher.start()
        self._watch_task = asyncio.create_task(self._watcher.run())
        await self._watcher.wait_assigned()

    async def _seen(self, ev: Any, record: Any) -> None:
        if getattr(ev, "job_id", None) != self.settings.job_id:
            return
        tl = self.timeline
        if isinstance(ev, NodeHeartbeat):
            prev = tl.heartbeats.get(ev.node_id)
            if prev is None or ev.seq > prev.seq:
                tl.heartbeats[ev.node_id] = ev
            tl.note_steps(ev, time.time())
        else:
            bucket = {
                WorkerExit: tl.exits,
                LogEvent: tl.logs,
                FaultIncident: tl.incidents,
                RecoveryPlan: tl.plans,
                RecoveryProgress: tl.progress,
                RecoveryCompleted: tl.completed,
            }.get(type(ev), tl.other)
            bucket.append(ev)
            if self.on_event:
                self.on_event(ev)
        tl.changed.set()

    async def stop(self) -> None:
        if hasattr(self, "_watcher"):
            self._watcher.stop()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            await self._producer.stop()
        self.sup.stop_all()
        for sock in glob.glob(f"/tmp/fr-{self.settings.job_id[:24]}-*.sock"):
            Path(sock).unlink(missing_ok=True)
        self.address_file().unlink(missing_ok=True)

    def address_file(self) -> Path:
        return job_address_file(self.settings.runtime_dir, self.settings.job_id)

    # ------------------------------------------------------------------ waiting
    async def wait_until(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}\n{self.diagnosis()}")
            self.timeline.changed.clear()
            try:
                await asyncio.wait_for(self.timeline.changed.wait(), 0.25)
            except TimeoutError:
                pass

    def diagnosis(self, log_lines: int = 3) -> str:
        """What a failed wait needs to be understood where only its message survives (a CI
        log): every rank as its last heartbeat showed it, the incidents, plans and outcomes,
        and the last lines each worker wrote."""
        tl = self.timeline
        out = ["ranks (node, step, generation, state, proc, since progress, pid):"]
        for rank, (node, r) in sorted(tl.rank_view().items()):
            out.append(
                f"  {rank}: {node} step {r.step} gen {r.generation} {r.state} {r.proc_state} "
                f"{r.since_progress_s:.1f}s pid {r.pid}"
            )
        out += [f"incident gen {i.generation}: {i.fault_class} {i.root_cause_ranks} {i.reason}" for i in tl.incidents]
        out += [f"plan {p.plan_id} gen {p.target_generation}: restart {sorted(p.restart_ranks)}" for p in tl.plans]
        out += [f"completed {c.plan_id}: {c.outcome} {c.reason}" for c in tl.completed]
        for path in sorted(self.run_dir.glob("sidecars/*/*.log")):
            lines = path.read_text(errors="replace").splitlines()[-log_lines:]
            out += [f"{path.parent.name}/{path.name}: {line[:300]}" for line in lines]
        return "\n".join(out)

    def min_step(self) -> int:
        view = self.timeline.rank_view()
        return min((r.step for _, r in view.values()), default=-1) if len(view) == self.world else -1

    def rank_status(self, rank: int):
        return self.timeline.rank_view().get(rank, (None, None))

    def finished(self) -> bool:
        return all((self.out_dir / f"rank{r}.pt").exists() for r in range(self.world))

    # ------------------------------------------------------------------ faults
    async def inject(self, fault: str, rank: int, at_step: int, timeout_s: float = 120.0) -> float:
        """Inject `fault` once `rank` has committed `at_step`; returns the fault's wall time.
        Faults the agent injects itself (ecc, exception, kill-<phase>) are configured through
        fault_env at start; their time is the sidecar's first report of them."""
        if fault == "none":
            return time.time()
        if fault in ("process-crash", "hang", "node-crash", "sidecar-crash"):
            await self.wait_until(
                lambda: self.rank_status(rank)[1] is not None and self.rank_status(rank)[1].step >= at_step,
                timeout_s,
                f"rank {rank} at step {at_step}",
            )
            return self.fault_now(fault, rank)

        # agent-injected: the first exit or matching log line from that rank marks the moment
        def seen():
            ev = next((e for e in self.timeline.exits if e.rank == rank and not e.expected), None) or next(
                (e for e in self.timeline.logs if e.rank == rank), None
            )
            return ev

        await self.wait_until(lambda: seen() is not None, timeout_s, f"{fault} on rank {rank}")
        return seen().emitted_at

    def fault_now(self, fault: str, rank: int) -> float:
        """process-crash | hang | node-crash on `rank` now, by the PID its last heartbeat named;
        returns the fault's wall time. A process already gone counts as faulted."""
        node, status = self.rank_status(rank)
        if status is None:
            raise RuntimeError(f"rank {rank} is not in any heartbeat yet")
        t = time.time()
        try:
            if fault == "process-crash":
                os.kill(status.pid, signal.SIGKILL)
            elif fault == "hang":
                os.kill(status.pid, signal.SIGSTOP)
            elif fault == "node-crash":
                proc = self.sup.procs[f"sidecar-{node}"]
                os.killpg(proc.pid, signal.SIGKILL)  # the sidecar and every worker it started
            elif fault == "sidecar-crash":
                # The sidecar alone: its workers die with it (they are started with a parent-death
                # SIGKILL), so the node goes silent and is recovered as lost; nothing re-attaches.
                os.kill(self.sup.procs[f"sidecar-{node}"].pid, signal.SIGKILL)
            else:
                raise ValueError(f"unknown worker fault {fault!r}")
        except ProcessLookupError:
            pass
        return t

    @staticmethod
    def fault_env_for(fault: str, rank: int, at_step: int) -> str | None:
        agent_kinds = {
            "ecc": "kind=ecc",
            "exception": "kind=exception",
            "kill-forward": "kind=kill,phase=forward",
            "kill-grad-sync": "kind=kill,phase=grad_sync",
            "kill-after-sync": "kind=kill,phase=after_sync",
            "kill-vote": "kind=kill,phase=vote",
            "kill-optimizer": "kind=kill,phase=optimizer",
        }
        if fault not in agent_kinds:
            return None
        return f"{agent_kinds[fault]},rank={rank},step={at_step}"

    # ------------------------------------------------------------------ results
    def final_states(self) -> dict[int, dict]:
        return {r: torch.load(self.out_dir / f"rank{r}.pt", weights_only=False) for r in range(self.world)}


def states_equal(a: dict[int, dict], b: dict[int, dict]) -> tuple[bool, str]:
    """Bitwise comparison of every rank's training state: model (parameters and buffers),
    optimizer (state and param_groups) and stateful objects (LR scheduler, ...)."""
    if a.keys() != b.keys():
        return False, f"ranks differ: {sorted(a)} vs {sorted(b)}"
    for r in a:
        for part in ("model", "optimizer", "stateful"):
            fa, fb = _flatten(a[r].get(part, {})), _flatten(b[r].get(part, {}))
            if fa.keys() != fb.keys():
                return False, f"rank {r} {part}: keys differ"
            for k in fa:
                x, y = fa[k], fb[k]
                if isinstance(x, torch.Tensor):
                    if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                        return False, f"rank {r} {part} {k}: tensors differ"
                elif x != y:
                    return False, f"rank {r} {part} {k}: {x!r} != {y!r}"
        if a[r]["step"] != b[r]["step"]:
            return False, f"rank {r}: step {a[r]['step']} vs {b[r]['step']}"
    return True, "bitwise equal"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}
