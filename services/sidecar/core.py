"""The sidecar's decisions, pure: which commands to act on, which log lines to forward, and
when a node's ranks have all reached a recovery stage."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from flashrecovery.shared.schemas import ExecutorCommand

# A cheap first pass only: anything that smells like an error goes to the detector, which owns
# the real signature catalog. Keeping this broad costs a few log events; missing a line costs a
# late detection.
PREFILTER = re.compile(
    r"error|exception|traceback|fatal|ecc|xid|nccl|gloo|connection (closed|reset|refused)|"
    r"fallen off|illegal (memory|instruction)|out of memory|timed? ?out|nvlink|abort|segmentation",
    re.IGNORECASE)


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
    handled: dict[str, list] = field(default_factory=dict)  # command id -> acks sent
    fence_token: int = 0  # the highest executor fence token seen
    refused_tokens: int = 0  # commands refused for an older token

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


def stage_reached(stage: str, local_ranks: list[int], progress: dict[int, set[str]]) -> bool:
    """All ranks hosted here reported `stage` (rebuilt / restored / resumed)."""
    return bool(local_ranks) and all(stage in progress.get(r, set()) for r in local_ranks)


def stage_failure(stage: str, local_ranks: list[int], progress: dict[int, set[str]],
                  errors: dict[int, str]) -> str | None:
    """Why this node's ranks cannot reach `stage`, or None: a rank that has not reached it
    reported an error during this recovery (e.g. a restored state failing its digest check).
    Known at once, not at the phase timeout."""
    failed = [r for r in local_ranks if r in errors and stage not in progress.get(r, set())]
    if not failed:
        return None
    return "; ".join(f"rank {r}: {errors[r]}" for r in failed)


def ranks_to_kill(kill_ranks: Iterable[int], generation: int,
                  workers: Iterable[tuple[int, int | None]]) -> set[int]:
    """The ranks of `kill_ranks` whose process here is the old one. workers: (rank, generation
    at which a standby became that rank, or None for a rank started as itself). A process
    assigned its rank in this generation or later is the replacement: a retried or replayed
    PAUSE / REPLACE must never kill it."""
    wanted = set(kill_ranks)
    return {rank for rank, assigned_at in workers
            if rank in wanted and (assigned_at is None or assigned_at < generation)}


def reports_stages(cmd: ExecutorCommand, node_id: str) -> bool:
    """Whether this node acks the RECOVER stages when they succeed (a failure is always
    reported). Only the nodes the executor named do (executor/core.py Waitlist.stages says why
    their reports speak for every rank), which keeps a recovery at about one ack per node, its
    pause report, however large the job."""
    return cmd.stage_nodes is None or node_id in cmd.stage_nodes
