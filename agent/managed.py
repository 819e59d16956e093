"""The public API for a user's own training script: a few lines, the loop left as it is.

    import flashrecovery.agent as fr

    agent = fr.init(seed=0)                      # instead of dist.init_process_group("gloo")
    model = agent.ddp(Net())                     # torch's DDP on the agent's dp group
    opt = torch.optim.AdamW(model.parameters()); sched = ...
    agent.register(model, opt, scheduler=sched)  # what a replaced rank receives
    for step in agent.steps(total_steps):        # instead of `for step in range(...)`
        x, y = batches(step)                     # a function of the step (fr.StepBatches)
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward()
        opt.step()                               # the commit rule runs here
        sched.step()                             # harmless: the agent steps it once per applied step

What the agent does around the user's code:
- ``init`` connects to the node's sidecar (``flashrecovery run``), joins generation 0's groups
  and installs a recoverable default group, so ``dist.get_rank()``, ``dist.all_reduce(x)`` and
  ``dist.barrier()`` work as after ``init_process_group``; ``agent.dp_group`` / ``tp_group`` are
  the data- and tensor-parallel groups (agent/process_group.py). A standby returns from ``init``
  only once it has been assigned the rank it replaces, so code that reads the rank is right.
- ``steps`` reseeds torch's default generators from (seed, step, rank) before every step, so a
  replacement draws exactly what the dead rank would have (``nn.Dropout`` unchanged), snapshots
  the model's buffers (running statistics change in forward: a step that is rolled back must not
  keep them), and after a recovery yields the step to resume from.
- ``optimizer.step()`` (wrapped in ``register``) applies a step only when every rank's
  collectives of that step succeeded and the commit vote passed (docs/commit-protocol.md);
  otherwise it runs the recovery and returns without applying.

Not supported yet (docs/integration.md): FSDP / ZeRO-sharded state, pipeline schedules,
gradient accumulation with several ``optimizer.step()`` per yielded step, functional
collectives on the recoverable groups, NCCL.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..shared import channel as ch
from .agent import AgentExit, RecoveryAgent
from .data import ResumableLoader, StepBatches
from .groups import CollectiveError, Interrupted, PauseRequested
from .process_group import RecoverableGroup, install
from .settings import DEFAULT_JOB_ID, AgentSettings, agent_env
from .transfer import Stateful, state_digest

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's default generators for (seed, step, rank): distinct per rank and
    step, a pure function of them (a replacement rank re-derives its predecessor's stream)."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1)


def settings_from_env(env: Mapping[str, str] | None = None) -> AgentSettings:
    """FLASHRECOVERY_AGENT_* as ``flashrecovery run`` sets them; without them (the same script under
    plain torchrun) the torchrun variables: it trains, without recovery."""
    env = os.environ if env is None else env
    if agent_env("rank") in env or agent_env("standby") in env or "RANK" not in env:
        return AgentSettings()
    return AgentSettings(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        rdzv=f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}",
        job_id=env.get("TORCHELASTIC_RUN_ID", DEFAULT_JOB_ID),
    )


class ManagedAgent(RecoveryAgent):
    """RecoveryAgent driven from a user's unchanged loop (see the module docstring)."""

    def __init__(self, settings: AgentSettings, tp: int = 1, seed: int = 0, **kw: Any) -> None:
        super().__init__(settings, tp=tp, **kw)
        self.seed = seed
        self._broken: str | None = None  # why the current step is lost (a collective failed)
        self._awaiting = False  # a standby / cold replacement: no state until `recover`
        self._next_step: int | None = None
        self._buffers_at: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._opt_step: Any = None
        self._sched_step: Any = None
        self.pgs: dict[str, RecoverableGroup] = {}
        self._mesh: DeviceMesh | None = None

    # ------------------------------------------------------------------ groups (GroupSession)
    def mark_broken(self, why: str) -> None:
        if self._broken is None:
            self._broken = why

    def step_broken(self) -> str | None:
        return self._broken

    def before_collective(self, kind: str) -> None:
        if self._step is not None:
            phase = {"dp": "grad_sync", "tp": "tp_collective"}.get(kind)
            if phase is not None:
                self.faults.maybe(self.rank, self._step, phase)

    @property
    def world_group(self) -> RecoverableGroup:
        return self.pgs["global"]

    @property
    def dp_group(self) -> RecoverableGroup:
        return self.pgs["dp"]

    @property
    def tp_group(self) -> RecoverableGroup:
        return self.pgs["tp"]

    @property
    def dp_index(self) -> int:
        assert self.rank is not None
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    def batches(self, dataset: Any, batch_size: int, *, seed: int | None = None, **kw: Any) -> StepBatches:
        """This replica's batches of ``dataset`` as a function of the step (data.StepBatches)."""
        return StepBatches(
            dataset,
            batch_size,
            dp_index=self.dp_index,
            dp_size=self.dp_size,
            seed=self.seed if seed is None else seed,
            **kw,
        )

    def ddp(self, module: torch.nn.Module, **kw: Any) -> DDP:
        """torch's DistributedDataParallel on the data-parallel group, as recovery needs it
        (check_ddp says why each setting)."""
        kw.setdefault("find_unused_parameters", True)
        return DDP(module, process_group=self.dp_group, init_sync=False, **kw)

    def device_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """A 2-D ``DeviceMesh`` ("dp", "tp") over the recoverable groups: ``mesh.get_group("tp")``
        is ``tp_group``, functional collectives and DTensor on it survive recoveries as the groups
        do (the mesh holds the groups, not a generation's backend)."""
        from torch.distributed.device_mesh import DeviceMesh  # imports DTensor machinery: on demand

        if self._mesh is None:
            layout = torch.arange(self.world_size).view(self.dp_size, self.tp)
            self._mesh = DeviceMesh.from_group(
                [self.dp_group, self.tp_group], device_type, mesh=layout, mesh_dim_names=("dp", "tp")
            )
        return self._mesh

    # ------------------------------------------------------------------ set-up
    def open(self, default_group: bool = True) -> None:
        if self.world_size % self.tp:
            raise ValueError(f"world size {self.world_size} is not a multiple of tp {self.tp}")
        self._connect()
        self._awaiting = self._awaits_state()
        if self._awaiting and self.rank is None:
            self._wait_assigned()
        if not self._awaiting:
            self._build_first_groups()
        assert self.store is not None and self.rank is not None
        self.pgs = install(self, self.store, self.rank, self.world_size, self.tp, default_group)
        atexit.register(self.close)
        self.log.info(
            "initialised",
            generation=self.generation,
            world_size=self.world_size,
            awaiting_state=self._awaiting,
            pid=os.getpid(),
        )

    def _wait_assigned(self) -> None:
        while self.rank is None:
            cmd = self._next_cmd(bounded=False)  # unassigned: no deadline (RecoveryAgent._standby_wait)
            if isinstance(cmd, ch.Assign):
                self._on_assign(cmd)
            elif isinstance(cmd, ch.Stop):
                self.close()
                raise AgentExit(0)
            # a pause before any assignment does not concern this standby

    def _on_assign(self, cmd: ch.Assign) -> None:
        if self.pgs and cmd.rank != self.rank:
            # The user's code has read its rank already (data slice, groups): it cannot become
            # another rank. Leave: the plan's replace step fails and is replanned.
            self.log.error("reassigned to another rank after init", rank=self.rank, to=cmd.rank)
            self._send(ch.Error(rank=self.rank, message=f"standby of rank {self.rank} cannot become rank {cmd.rank}"))
            self.close()
            raise AgentExit(1)
        super()._on_assign(cmd)

    def register(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any = None,
        stateful: Mapping[str, Stateful] | None = None,
    ) -> None:
        """The training state a replaced rank receives (transfer.py's contract), and the hooks:
        ``optimizer.step()`` runs the commit rule; ``scheduler.step()`` becomes the agent's (once
        per applied step, recovery commits included), so a loop's own call is a no-op."""
        for m in model.modules():
            if isinstance(m, DDP):
                check_ddp(m, self)
        self.attach(model, optimizer, scheduler=scheduler, stateful=stateful)
        self._opt_step = optimizer.step

        def managed_step(closure: Any = None) -> None:
            optimizer._opt_called = True  # type: ignore[attr-defined]  # LR scheduler's check
            self._user_optimizer_step(closure)

        # Marked as LR-scheduler-wrapped: a scheduler built after this must not re-wrap it (it
        # would rebind the function to the optimizer).
        managed_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = managed_step  # type: ignore[method-assign]
        if scheduler is not None:
            # The class, not an instance attribute: a scheduler's state_dict is its __dict__.
            cls = type(scheduler)
            self._sched_step = lambda: cls.step(scheduler)
            scheduler.__class__ = type(f"Managed{cls.__name__}", (cls,), {"step": _scheduler_step_by_agent})

    def _optimizer_step(self) -> None:
        self._opt_step()

    def _scheduler_step(self) -> None:
        self._sched_step()

    # ------------------------------------------------------------------ the loop
    def steps(self, total: int) -> Iterator[int]:
        """Yield the steps to run, 1..total; after a recovery, the step to resume from. When
        done, report it and serve as a replica until the whole job has finished."""
        if self.state is None:
            raise RuntimeError("agent.register(model, optimizer) before agent.steps()")
        step = self._standby_wait() if self._awaiting else self.applied_step + 1
        self._awaiting = False
        while step <= total:
            if self.interruptor.interrupted:
                step = self._recover_now(PauseRequested(self.interruptor.reason or "pause"))
                continue
            self._begin(step)
            yield step
            if self._next_step is None:  # the body did not reach optimizer.step()
                if self._broken is None and not self.interruptor.interrupted:
                    raise RuntimeError(
                        f"step {step}: optimizer.step() was not called (once per step inside agent.steps())"
                    )
                step = self._recover_now(CollectiveError(self._broken or "interrupted"))
                continue
            step = self._next_step
        assert self.state is not None and self.model is not None and self.optimizer is not None
        self._serve_until_stop(state_digest(self.model, self.optimizer, self.state.stateful, self.applied_step))

    def _begin(self, step: int) -> None:
        assert self.model is not None and self.rank is not None
        self._next_step, self._broken = None, None
        self._buffers_at = (step, [(b, b.detach().clone()) for b in self.model.buffers()])
        for loader in self._loaders():
            loader.begin_step(step)
        torch.manual_seed(step_seed(self.seed, step, self.rank))
        self._start_step(step)

    def _user_optimizer_step(self, closure: Any = None) -> None:
        step = self._step
        if step is None or self._next_step is not None:
            raise RuntimeError("optimizer.step() runs once per step inside agent.steps()")
        try:
            if self._broken is not None:
                raise CollectiveError(self._broken)
            self.interruptor.check()
            self.grads_step = step  # every collective of the step succeeded: reduced gradients
            self.faults.maybe(self.rank, step, "after_sync")
            self._next_step = self.commit()
        except Interrupted as exc:
            self._next_step = self._recover_now(exc)

    def _recover_now(self, exc: Interrupted) -> int:
        resume = self.recover(exc)
        self._step = None
        return resume

    def _before_transfers(self) -> None:
        # A step that was rolled back ran its forward: buffers it changed go back to the step's
        # start before this rank serves as a replica or resumes (a committed step keeps them).
        if self._buffers_at is not None and self.applied_step < self._buffers_at[0]:
            with torch.no_grad():
                for live, saved in self._buffers_at[1]:
                    live.copy_(saved)
        self._buffers_at = None
        for loader in self._loaders():
            loader.roll_back(self.applied_step)

    def _loaders(self) -> list[ResumableLoader]:
        stateful = self.state.stateful.values() if self.state is not None else ()
        return [s for s in stateful if isinstance(s, ResumableLoader)]


def check_ddp(ddp: DDP, agent: ManagedAgent) -> None:
    """Refuse a DistributedDataParallel that cannot survive a recovery, saying why.

    - its process group must be one of the agent's (a group of torch's own does not outlive
      a generation);
    - ``find_unused_parameters=True`` (and no ``static_graph``): otherwise DDP lays out its
      gradient buckets anew in its second iteration, by the order gradients became ready, and a
      replacement's fresh DDP would still use the first layout while the survivors use the
      second: the ranks would all-reduce misaligned buffers for one step (seen: the replaced rank
      diverged from the others by 1e-3 after one step, a fault-free run differed everywhere).
      With it, the first layout is kept for good, the same on every rank, fresh or not.
    ``init_sync=False`` is needed too, but DDP does not keep it: a replacement would otherwise
    wait in DDP's constructor for a broadcast nobody sends (agent.ddp sets all three)."""
    if not isinstance(ddp.process_group, RecoverableGroup) or ddp.process_group._session is not agent:
        raise ValueError(
            "DistributedDataParallel must use the agent's group: "
            "DDP(module, process_group=agent.dp_group, init_sync=False, "
            "find_unused_parameters=True), or agent.ddp(module)"
        )
    if not ddp.find_unused_parameters or ddp.static_graph:
        raise ValueError(
            "DistributedDataParallel needs find_unused_parameters=True (and no "
            "static_graph) to be recoverable: its bucket layout must never change, "
            "or a replaced rank's fresh DDP would reduce misaligned gradients. Use "
            "agent.ddp(module), or pass find_unused_parameters=True"
        )


def _scheduler_step_by_agent(self: Any, *args: Any, **kwargs: Any) -> None:
    """A registered scheduler's step(): the agent steps it once per applied step instead."""


def init(tp: int | None = None, seed: int = 0, *, default_group: bool = True) -> ManagedAgent:
    """Join the job: in place of ``dist.init_process_group``. ``tp``: tensor-parallel degree
    (ranks r with the same r // tp form one data-parallel replica; default: the launcher's
    ``--tp``, else 1); ``seed``: the base of the per-step RNG seeds."""
    settings = settings_from_env()
    launched = settings.tp
    if tp is not None and launched is not None and tp != launched:
        # The planner picks state sources by the registered tp: a script that shards otherwise
        # would receive another shard's state after a fault.
        raise ValueError(
            f"the script uses tp={tp} but the job was launched with --tp {launched}: "
            "pass the same tensor-parallel degree to both"
        )
    agent = ManagedAgent(settings, tp=tp or launched or 1, seed=seed)
    agent.open(default_group=default_group)
    return agent
