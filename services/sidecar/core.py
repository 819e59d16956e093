"""The sidecar's decisions, pure: which commands to act on, which log lines to forward, and
when a node's ranks have all reached a recovery stage."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flashrecovery.shared.schemas import ExecutorCommand, RankState
from flashrecovery.shared.settings import agent_env

# A cheap first pass only: anything that smells like an error goes to the detector, which owns
# the real signature catalog. Keeping this broad costs a few log events; missing a line costs a
# late detection.
PREFILTER = re.compile(
    r"error|exception|traceback|fatal|ecc|xid|nccl|gloo|connection (closed|reset|refused)|"
    r"fallen off|illegal (memory|instruction)|out of memory|timed? ?out|nvlink|abort|segmentation",
    re.IGNORECASE,
)


def prefilter(line: str) -> str | None:
    m = PREFILTER.search(line)
    return m.group(0).lower() if m else None


@dataclass
class TokenBucket:
    """Rate limit for forwarded log lines, per worker; the clock is passed in."""

    rate: float
    burst: int
    tokens: float = -1.0
    last: float = 0.0
    dropped: int = 0

    def allow(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.last = float(self.burst), now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


@dataclass
class CommandGate:
    """Acts on each command once, for this node, from the current generation or newer, and
    from the newest executor leader seen: a deposed leader (its fence token lower than one
    already seen) may still be sending; its commands are refused and counted."""

    node_id: str
    generation: int = 0
    handled: dict[str, list[Any]] = field(default_factory=dict)  # command id -> acks sent
    fence_token: int = 0  # the highest executor fence token seen
    refused_tokens: int = 0  # commands refused for an older token
    refused_commands: int = 0  # commands refused by command_refusal (forged or absurd)

    def decide(self, cmd: ExecutorCommand) -> tuple[str, str]:
        """-> (verdict, reason); verdict is act, replay (resend cached acks) or ignore. A
        command that is not ignored raises the highest token seen."""
        if cmd.nodes is not None and self.node_id not in cmd.nodes:
            return "ignore", "addressed to other nodes"
        if cmd.fence_token is not None:
            if cmd.fence_token < self.fence_token:
                self.refused_tokens += 1
                return "ignore", f"stale fence token {cmd.fence_token} < {self.fence_token}: deposed executor"
            self.fence_token = cmd.fence_token
        if cmd.command_id in self.handled:
            return "replay", "duplicate delivery: resend the acks already sent"
        if cmd.generation < self.generation:
            return "ignore", f"stale generation {cmd.generation} < {self.generation}"
        return "act", "new command"


@dataclass(frozen=True)
class RegistryView:
    """What the registry says about the job when a command arrives: its generation (the
    executor fences, bumping it, before it sends a plan's commands), world size and the
    executor lease's newest fence token (None: not checked)."""

    generation: int
    world_size: int
    fence_token: int | None = None


def command_refusal(cmd: ExecutorCommand, view: RegistryView | None) -> str | None:
    """Why a command must not reach the gate (CommandGate.decide), or None. Checked before the
    gate learns its generation or token: a forged command with generation 10^9 (or token 10^18)
    would otherwise make every real command after it look stale, and blind the node."""
    if view is None:
        return "registry unreachable: the command cannot be checked"
    if cmd.generation > view.generation:
        return f"generation {cmd.generation} is ahead of the registry's {view.generation}"
    if cmd.fence_token is not None and view.fence_token is not None and cmd.fence_token > view.fence_token:
        return f"fence token {cmd.fence_token} was never issued (newest {view.fence_token})"
    world = view.world_size
    bad = [r for r in cmd.kill_ranks if not 0 <= r < world]
    bad += [a.rank for a in cmd.assignments if not 0 <= a.rank < world or a.local_rank < 0]
    bad += [r for t in cmd.transfers for r in (t.src, t.dst) if not 0 <= r < world]
    if bad:
        return f"ranks not in the job's topology (world size {world}): {bad[:5]}"
    if cmd.action == "recover":
        if cmd.world_size != world:
            return f"world size {cmd.world_size} does not match the registry's {world}"
        if cmd.in_band:  # the ranks decide both steps; the command must not pretend to
            if cmd.resume_step is not None or cmd.commit_step is not None:
                return "an in-band recover carries no resume or commit step"
        elif cmd.resume_step is None or cmd.resume_step < 0 or (cmd.commit_step is not None and cmd.commit_step < -1):
            return f"resume step {cmd.resume_step} / commit step {cmd.commit_step} out of range"
    return None


def stage_reached(stage: str, local_ranks: list[int], progress: dict[int, set[str]]) -> bool:
    """All ranks hosted here reported `stage` (rebuilt / restored / resumed)."""
    return bool(local_ranks) and all(stage in progress.get(r, set()) for r in local_ranks)


def stage_failure(
    stage: str, local_ranks: list[int], progress: dict[int, set[str]], errors: dict[int, str]
) -> str | None:
    """Why this node's ranks cannot reach `stage`, or None: a rank that has not reached it
    reported an error during this recovery (e.g. a restored state failing its digest check).
    Known at once, not at the phase timeout."""
    failed = [r for r in local_ranks if r in errors and stage not in progress.get(r, set())]
    if not failed:
        return None
    return "; ".join(f"rank {r}: {errors[r]}" for r in failed)


def ranks_to_kill(kill_ranks: Iterable[int], generation: int, workers: Iterable[tuple[int, int | None]]) -> set[int]:
    """The ranks of `kill_ranks` whose process here is the old one. workers: (rank, generation
    at which a standby became that rank, or None for a rank started as itself). A process
    assigned its rank in this generation or later is the replacement: a retried or replayed
    PAUSE / REPLACE must never kill it."""
    wanted = set(kill_ranks)
    return {
        rank for rank, assigned_at in workers if rank in wanted and (assigned_at is None or assigned_at < generation)
    }


@dataclass(frozen=True)
class WorkerFate:
    """What _recover needs to know of one worker process of this node."""

    rank: int | None
    alive: bool
    unexpected_exit: bool  # died without the executor ordering it or the job finishing
    exited_in_generation: int | None  # this node's command generation when it died


def lost_before_recover(generation: int, replaced: Iterable[int], workers: Iterable[WorkerFate]) -> list[int]:
    """Ranks of this node that died since the fence of this RECOVER's plan and that the plan
    does not replace: this node cannot rebuild with them, so it fails the stage at once (the
    planner's superseding plan takes over) instead of waiting the rebuild out. A death seen at
    the previous generation counts too (between the fence and this node's PAUSE); the plan's own
    victims then are `replaced`, and older victims died earlier still."""
    fates = list(workers)
    alive = {w.rank for w in fates if w.alive and w.rank is not None}
    skip = set(replaced) | alive
    return sorted(
        {
            w.rank
            for w in fates
            if w.rank is not None
            and not w.alive
            and w.unexpected_exit
            and w.exited_in_generation is not None
            and w.exited_in_generation >= generation - 1
            and w.rank not in skip
        }
    )


# ---------------------------------------------------------------- warm standbys
# A rank in these states is still being started or recovered: a new standby's torch import would
# take CPU that the recovery on this node needs (issue #14 item 1: replenished off the critical path).
_REFILL_WAITS_FOR = frozenset({RankState.STARTING, RankState.PAUSED, RankState.RECOVERING})


def standbys_wanted(role: str, capacity: int, hosted: int, per_node: int) -> int:
    """Standbys this node keeps warm: a spare one per free slot (the planner moves replaced
    ranks onto them); an active node `per_node`, for restarting its own ranks in place."""
    return max(0, capacity - hosted) if role == "spare" else max(0, per_node)


def standby_local_ranks(used: Iterable[int], n: int) -> list[int]:
    """Local ranks for n new standbys: the lowest not held by a rank or another standby of this
    node. A heartbeat's rows are keyed by local rank (the detector's view of a node), so a
    standby sharing its rank's (an active node's, whose ranks fill its slots) hid that rank:
    a stopped rank went unseen and its blocked peers were blamed for the hang."""
    taken = set(used)
    out: list[int] = []
    candidate = 0
    while len(out) < n:
        if candidate not in taken:
            out.append(candidate)
        candidate += 1
    return out


# A rank counts as recovering, for the refill, until it committed this many steps after its
# recovery: the recovery's RTO ends only at the first commit after it (every rank), and that
# step's first collectives also connect the new groups; a new interpreter importing torch must
# not share the CPU with them (issue #14 item 1: a refill never counts in RTO).
REFILL_AFTER_STEPS = 3


def refill_state(state: RankState, steps_since_recovery: int) -> RankState:
    """A rank's state as the refill rule sees it (standbys_to_start)."""
    if state is RankState.RUNNING and steps_since_recovery < REFILL_AFTER_STEPS:
        return RankState.RECOVERING
    return state


def standbys_to_start(wanted: int, standing: int, rank_states: Iterable[RankState], waited_out: bool = False) -> int:
    """How many standbys to start now: none while a rank of this node is starting or
    recovering, unless the caller has waited that out (bounded); none once a rank has finished
    (the job is ending: nothing will restart); else the ones missing."""
    states = list(rank_states)
    if RankState.DONE in states or (not waited_out and any(s in _REFILL_WAITS_FOR for s in states)):
        return 0
    return max(0, wanted - standing)


def decided_resume_step(cmd: ExecutorCommand, progress: Iterable[tuple[str, int | None]]) -> int:
    """The step this node's ranks resume at: the command's, or in an in-band recovery the one
    its ranks decided (all alike: one reduced vector). progress: (phase, resume_step) of the
    ranks' progress messages; -1 if none carried it (a node reaches `verified` only after its
    ranks' `rebuilt`, which carries it)."""
    if not cmd.in_band:
        return cmd.resume_step or 0
    return next((step for phase, step in progress if phase == "rebuilt" and step is not None), -1)


def reports_stages(cmd: ExecutorCommand, node_id: str) -> bool:
    """Whether this node acks a PAUSE, or a RECOVER's stages, when they succeed (a failure is
    always reported). Only the nodes the executor named do (executor/core.py Waitlist says why
    their reports speak for every rank): with the in-band decision a recovery costs the
    executor a few acks per changed node, however large the job."""
    return cmd.stage_nodes is None or node_id in cmd.stage_nodes


# ---------------------------------------------------------------- how a worker is started
# Variables a torchrun worker reads. Set afresh for every worker (a value inherited from the
# sidecar's own environment would be another job's); RANK and ROLE_RANK only for ranked workers.
TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_MAX_RESTARTS",
)


def worker_argv(python: str, module: str, script: str, args: list[str]) -> list[str]:
    """`python -m module ARGS` or `python script ARGS`: exactly one of module and script (the
    settings validate it); ARGS passed as given."""
    if bool(module) == bool(script):
        raise ValueError(f"exactly one of module ({module!r}) and script ({script!r})")
    return [python, "-m", module, *args] if module else [python, script, *args]


WARM_START_MODULE = "flashrecovery.sidecar.warm_start"


def refill_argv(argv: list[str], nice: int, preimport: list[str]) -> list[str]:
    """A refill standby's command (sidecar.warm_start): `argv` (worker_argv's) run after its
    `preimport` modules are imported in a thread niced to `nice`. Unchanged when nothing is
    preimported or nice is 0 (the whole standby then imports at the worker's niceness)."""
    if nice <= 0 or not preimport:
        return list(argv)
    return [argv[0], "-m", WARM_START_MODULE, "--nice", str(nice), "--preimport", ",".join(preimport), "--", *argv[1:]]


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker sits in the job. rank None: a standby (it learns its rank from the agent
    when it is assigned one)."""

    job_id: str
    node_id: str
    node_rank: int
    rank: int | None
    local_rank: int
    local_world_size: int
    world_size: int
    generation: int
    rdzv: str  # host:port of the job's rendezvous TCPStore server; "" when none
    agent_socket: str
    local_rank_base: int = 0  # torchrun's LOCAL_RANK = local_rank_base + local_rank


def worker_env(base: dict[str, str], place: WorkerPlace) -> dict[str, str]:
    """The environment of one worker: `base` (the sidecar's own), the FLASHRECOVERY_AGENT_*
    settings the agent reads (shared.settings.AgentSettings), and what torchrun gives its workers, so that an unmodified script's
    `init_process_group()` (env://, torch/distributed/rendezvous.py) finds RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT and, with TORCHELASTIC_USE_AGENT_STORE=True, connects to the
    job's rendezvous store as a client instead of hosting one on rank 0.

    TORCHELASTIC_RESTART_COUNT is the generation (each recovery bumps it);
    TORCHELASTIC_MAX_RESTARTS is 0: the worker group is never restarted as a whole, a recovery
    replaces single ranks in place. GROUP_RANK is -1 on a spare node (no node rank of its own)."""
    env = {k: v for k, v in base.items() if k not in TORCHRUN_VARS}
    env.update(
        {
            agent_env("job_id"): place.job_id,
            agent_env("node_id"): place.node_id,
            agent_env("local_rank"): str(place.local_rank),
            agent_env("world_size"): str(place.world_size),
            agent_env("generation"): str(place.generation),
            agent_env("rdzv"): place.rdzv,
            agent_env("socket"): place.agent_socket,
            "PYTHONUNBUFFERED": "1",
            "LOCAL_RANK": str(place.local_rank_base + place.local_rank),
            "WORLD_SIZE": str(place.world_size),
            "LOCAL_WORLD_SIZE": str(place.local_world_size),
            "GROUP_RANK": str(place.node_rank),
            "GROUP_WORLD_SIZE": str(max(1, place.world_size // max(1, place.local_world_size))),
            "ROLE_NAME": "default",
            "ROLE_WORLD_SIZE": str(place.world_size),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": str(place.generation),
            "TORCHELASTIC_RUN_ID": place.job_id,
            "TORCHELASTIC_MAX_RESTARTS": "0",
        }
    )
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    host, _, port = place.rdzv.rpartition(":")
    if host and port.isdigit():
        env["MASTER_ADDR"], env["MASTER_PORT"] = host, port
    if place.rank is None:
        env[agent_env("standby")] = "1"
        env.pop(agent_env("rank"), None)
        env.pop(agent_env("fault"), None)  # faults are injected into ranks, never standbys
    else:
        env[agent_env("rank")] = env["RANK"] = env["ROLE_RANK"] = str(place.rank)
        env.pop(agent_env("standby"), None)
    # Eager gloo connect: lazy pair set-up deadlocked on the first tp allreduce with 8 ranks
    # here (torch 2.13), while eager set-up is a few ms per group at this size.
    env.setdefault(agent_env("gloo_lazy"), "0")
    return env


def node_rank(configured: int, ranks: list[int]) -> int:
    """torchrun's GROUP_RANK: as configured, else the first hosted rank / ranks hosted (nodes
    host equal, contiguous blocks of ranks); -1 for a node that hosts none (a spare)."""
    if configured >= 0:
        return configured
    return ranks[0] // len(ranks) if ranks else -1
