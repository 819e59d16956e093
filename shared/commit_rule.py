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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class PausedReport(Protocol):
    """What decide_recovery reads from a paused report (shared.channel.Paused fits)."""

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
    return decide_from_rows((r.rank, r.applied_step, r.grads_step, r.vote_step) for r in reports)


def decide_from_rows(rows: Iterable[tuple[int, int, int | None, int]]) -> RecoveryDecision:
    """decide_recovery on (rank, applied_step, grads_step, vote_step) tuples: what the executor
    has from 100k ranks' columnar reports, without an object per rank."""
    # The rule is checked once per distinct (applied, grads, vote): 100k ranks report a handful
    # of them. Where a check fails, the lowest failing rank is named, as a rank-by-rank pass would.
    groups: dict[tuple[int, int | None, int], list[int]] = {}
    ranks: list[int] = []
    for rank, applied, grads, vote in rows:
        ranks.append(rank)
        groups.setdefault((applied, grads, vote), []).append(rank)
    if not ranks:
        raise InconsistentReports("no survivor reports")
    if len(set(ranks)) != len(ranks):
        raise InconsistentReports(f"duplicate ranks in reports: {ranks_text(sorted(ranks))}")
    bad = [(min(rs), key) for key, rs in groups.items() if key[0] > key[2] or key[2] > key[0] + 1]
    if bad:
        rank, (applied, _, vote) = min(bad)
        if applied > vote:
            raise InconsistentReports(
                f"rank {rank} applied step {applied} without completing its vote (vote_step {vote})"
            )
        raise InconsistentReports(f"rank {rank} voted step {vote} but applied only {applied}")
    v = max(vote for _, _, vote in groups)
    lagging_groups = {key: rs for key, rs in groups.items() if key[0] < v}
    bad = [(min(rs), key) for key, rs in lagging_groups.items() if key[0] != v - 1 or key[1] != v]
    if bad:
        rank, (applied, grads, _) = min(bad)
        if applied != v - 1:
            raise InconsistentReports(f"rank {rank} applied step {applied}, more than one behind voted step {v}")
        raise InconsistentReports(f"step {v} was voted but rank {rank} holds gradients of {grads}, not {v}")

    def holding(pred: Callable[[tuple[int, int | None, int]], bool]) -> list[int]:
        return sorted(r for key, rs in groups.items() if pred(key) for r in rs)

    discarded = any(grads is not None and grads > v for _, grads, _ in groups)
    tail = f"; in-flight step {v + 1} discarded" + (
        f" (reduced gradients held by ranks {ranks_text(holding(lambda k: k[1] == v + 1))})" if discarded else ""
    )
    if lagging_groups:
        lagging = sorted(r for rs in lagging_groups.values() for r in rs)
        return RecoveryDecision(
            commit_step=v,
            resume_step=v + 1,
            reason=(
                f"vote of step {v} completed on ranks {ranks_text(holding(lambda k: k[2] == v))}; "
                f"ranks {ranks_text(lagging)} apply it now"
            ),
        )
    if v == 0:
        return RecoveryDecision(None, 1, "no step committed yet" + tail)
    return RecoveryDecision(None, v + 1, f"all survivors applied step {v}" + tail)
