"""Exactly-once step commit: the recovery decision as a pure function.

See docs/commit-protocol.md. Steps are counted from 1; ``applied_step == 0`` means no step yet.

Per step s every rank: zero grads, forward, backward (tp collectives), dp gradient allreduce
(-> grads_step = s), commit vote = 1-element allreduce over the global group (-> vote_step = s),
then optimizer.step() (-> applied_step = s).

A vote that completed on ANY rank proves every rank entered it, hence every rank finished the dp
allreduce of that step and holds its reduced gradients. So from the survivors' paused reports:
V = max vote_step; survivors with applied_step == V - 1 apply V now (commit_step = V), and training
resumes at V + 1. A step whose vote completed nowhere is discarded and recomputed.

No I/O, no clock: the executor service imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence


class PausedReport(Protocol):
    """What decide_recovery reads from a paused report (agent.channel.Paused fits)."""

    rank: int
    applied_step: int
    grads_step: int | None
    vote_step: int


@dataclass(frozen=True)
class RecoveryDecision:
    commit_step: int | None  # step the lagging survivors must apply before anything else
    resume_step: int  # next step to compute
    reason: str


class InconsistentReports(ValueError):
    """The reports contradict the protocol (a bug or a report from another generation)."""


def ranks_text(ranks: Sequence[int], shown: int = 8) -> str:
    """A rank list for a reason string: the first few and how many, so a reason stays one short
    line at 100k ranks (it is logged and kept in the registry's run state)."""
    if len(ranks) <= shown:
        return str(list(ranks))
    return f"[{', '.join(map(str, ranks[:shown]))}, ... {len(ranks)} ranks]"


def decide_recovery(reports: Iterable[PausedReport]) -> RecoveryDecision:
    """Decide which step to commit and where to resume from the survivors' paused reports."""
    reps = sorted(reports, key=lambda r: r.rank)
    if not reps:
        raise InconsistentReports("no survivor reports")
    ranks = [r.rank for r in reps]
    if len(set(ranks)) != len(ranks):
        raise InconsistentReports(f"duplicate ranks in reports: {ranks_text(ranks)}")
    for r in reps:
        if r.applied_step > r.vote_step:
            raise InconsistentReports(
                f"rank {r.rank} applied step {r.applied_step} without completing its vote "
                f"(vote_step {r.vote_step})"
            )
        if r.vote_step > r.applied_step + 1:
            raise InconsistentReports(
                f"rank {r.rank} voted step {r.vote_step} but applied only {r.applied_step}"
            )
    v = max(r.vote_step for r in reps)
    lagging = [r for r in reps if r.applied_step < v]
    for r in lagging:
        if r.applied_step != v - 1:
            raise InconsistentReports(
                f"rank {r.rank} applied step {r.applied_step}, more than one behind voted step {v}"
            )
        if r.grads_step != v:
            raise InconsistentReports(
                f"step {v} was voted but rank {r.rank} holds gradients of {r.grads_step}, not {v}"
            )
    discarded = sorted({r.grads_step for r in reps if r.grads_step is not None and r.grads_step > v})
    tail = f"; in-flight step {v + 1} discarded" + (
        f" (reduced gradients held by ranks {ranks_text([r.rank for r in reps if r.grads_step == v + 1])})"
        if discarded
        else ""
    )
    if lagging:
        return RecoveryDecision(
            commit_step=v,
            resume_step=v + 1,
            reason=(
                f"vote of step {v} completed on ranks "
                f"{ranks_text([r.rank for r in reps if r.vote_step == v])}; ranks "
                f"{ranks_text([r.rank for r in lagging])} apply it now"
            ),
        )
    if v == 0:
        return RecoveryDecision(None, 1, "no step committed yet" + tail)
    return RecoveryDecision(None, v + 1, f"all survivors applied step {v}" + tail)


def plan_transfers(
    failed: Iterable[int], survivors: Sequence[int], tp: int, load: Mapping[int, int] | None = None
) -> list[tuple[int, int]]:
    """(src, dst) pairs: each failed rank gets a surviving replica of its shard (rank % tp).

    Picks the least-loaded survivor of the shard, lowest rank first. Raises InconsistentReports
    when a shard has no surviving replica (recover from a checkpoint instead).
    """
    used: dict[int, int] = dict(load or {})
    out: list[tuple[int, int]] = []
    for dst in sorted(failed):
        cands = [s for s in sorted(survivors) if s % tp == dst % tp]
        if not cands:
            raise InconsistentReports(f"shard {dst % tp} of rank {dst} has no surviving replica")
        src = min(cands, key=lambda s: (used.get(s, 0), s))
        used[src] = used.get(src, 0) + 1
        out.append((src, dst))
    return out
