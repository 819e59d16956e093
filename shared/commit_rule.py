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


Key = tuple[int, int | None, int]  # (applied_step, grads_step, vote_step)


def decide_from_rows(rows: Iterable[tuple[int, int, int | None, int]]) -> RecoveryDecision:
    """decide_recovery on (rank, applied_step, grads_step, vote_step) tuples: what the executor
    has from 100k ranks' columnar reports, without an object per rank."""
    # The rule is checked once per distinct (applied, grads, vote): 100k ranks report a handful
    # of them. Where a check fails, the lowest failing rank is named, as a rank-by-rank pass would.
    groups: dict[Key, list[int]] = {}
    ranks: list[int] = []
    for rank, applied, grads, vote in rows:
        ranks.append(rank)
        groups.setdefault((applied, grads, vote), []).append(rank)
    if not ranks:
        raise InconsistentReports("no survivor reports")
    if len(set(ranks)) != len(ranks):
        raise InconsistentReports(f"duplicate ranks in reports: {ranks_text(sorted(ranks))}")

    def holding(pred: Callable[[Key], bool]) -> str:
        return ranks_text(sorted(r for key, rs in groups.items() if pred(key) for r in rs))

    return _decide({key: min(rs) for key, rs in groups.items()}, holding)


def _decide(lowest: dict[Key, int], holding: Callable[[Callable[[Key], bool]], str]) -> RecoveryDecision:
    """The rule on the distinct (applied, grads, vote) keys reported, each with its lowest rank;
    holding(pred) names the ranks whose key satisfies pred, for the reason."""
    bad = [(low, key) for key, low in lowest.items() if key[0] > key[2] or key[2] > key[0] + 1]
    if bad:
        rank, (applied, _, vote) = min(bad)
        if applied > vote:
            raise InconsistentReports(
                f"rank {rank} applied step {applied} without completing its vote (vote_step {vote})"
            )
        raise InconsistentReports(f"rank {rank} voted step {vote} but applied only {applied}")
    v = max(vote for _, _, vote in lowest)
    lagging_keys = [key for key in lowest if key[0] < v]
    bad = [(lowest[key], key) for key in lagging_keys if key[0] != v - 1 or key[1] != v]
    if bad:
        rank, (applied, grads, _) = min(bad)
        if applied != v - 1:
            raise InconsistentReports(f"rank {rank} applied step {applied}, more than one behind voted step {v}")
        raise InconsistentReports(f"step {v} was voted but rank {rank} holds gradients of {grads}, not {v}")

    discarded = any(grads is not None and grads > v for _, grads, _ in lowest)
    tail = f"; in-flight step {v + 1} discarded" + (
        f" (reduced gradients held by ranks {holding(lambda k: k[1] == v + 1)})" if discarded else ""
    )
    if lagging_keys:
        return RecoveryDecision(
            commit_step=v,
            resume_step=v + 1,
            reason=(
                f"vote of step {v} completed on ranks {holding(lambda k: k[2] == v)}; "
                f"ranks {holding(lambda k: k[0] < v)} apply it now"
            ),
        )
    if v == 0:
        return RecoveryDecision(None, 1, "no step committed yet" + tail)
    return RecoveryDecision(None, v + 1, f"all survivors applied step {v}" + tail)


# ---------------------------------------------------------------- the in-band decision
# Issue #14 item 2: the executor must not receive a report per healthy node. The survivors
# decide among themselves instead, in ONE element-wise MAX allreduce over the rebuilt global
# group of generation g+1 (a minimum is the MAX of the negation). Each rank contributes
# in_band_row(); every rank then runs decide_in_band() on the same reduced vector, so all reach
# the same decision, and it is decide_from_rows()'s decision on the survivors' reports (proof in
# docs/commit-protocol.md "The in-band decision"; tests/unit/test_commit_rule.py checks both on
# random report sets). Restarted ranks contribute neutral values, as the rule ignores them.

IN_BAND_FIELDS = (
    "vote",  # max vote_step = V
    "neg_progress",  # -min progress: progress = applied + 1 if the rank holds that step's gradients, else applied
    "neg_applied",  # -min applied_step: some survivor lags V, so V is committed
    "grads",  # max grads_step (-1: none): the in-flight step some rank had reduced
    "applied",  # max applied_step: with grads, how far any survivor computed
    "bad",  # 1 if some survivor's own counters break the protocol
    "neg_bad_rank",  # -(lowest such rank), for the reason
)
_NEUTRAL = -(2**62)  # the MAX identity for these fields (int64)


def in_band_row(rank: int, applied: int, grads: int | None, vote: int, restarting: bool) -> list[int]:
    """One rank's contribution to the in-band MAX allreduce (IN_BAND_FIELDS order)."""
    if restarting:  # the rule ignores restart ranks: the identity of MAX everywhere
        return [-1, _NEUTRAL, _NEUTRAL, -1, -1, 0, _NEUTRAL]
    g = -1 if grads is None else grads
    progress = applied + 1 if g == applied + 1 else applied
    bad = applied > vote or vote > applied + 1
    return [vote, -progress, -applied, g, applied, int(bad), -rank if bad else _NEUTRAL]


def combine_in_band(rows: Iterable[Sequence[int]]) -> list[int]:
    """What the allreduce computes: the element-wise maximum (for tests and simulations)."""
    out = [-1, _NEUTRAL, _NEUTRAL, -1, -1, 0, _NEUTRAL]
    for row in rows:
        out = [max(a, b) for a, b in zip(out, row, strict=True)]
    return out


@dataclass(frozen=True)
class InBandDecision:
    decision: RecoveryDecision
    computed_step: int  # the furthest step any survivor computed (applied, or gradients held)


def decide_in_band(reduced: Sequence[int]) -> InBandDecision:
    """decide_from_rows' decision from the reduced vector: the same commit and resume steps, and
    a refusal exactly where decide_from_rows refuses (its reason names fewer ranks)."""
    v, neg_progress, neg_applied, grads, applied_max, bad, neg_bad_rank = (int(x) for x in reduced)
    if v < 0:
        raise InconsistentReports("no survivor reports")
    if bad:
        raise InconsistentReports(
            f"rank {-neg_bad_rank} reported an applied step and a vote step the protocol forbids "
            "(applied without its vote, or a vote more than one step ahead)"
        )
    lowest_applied, lowest_progress = -neg_applied, -neg_progress
    if lowest_progress < v:
        if lowest_applied < v - 1:
            raise InconsistentReports(f"a survivor applied step {lowest_applied}, more than one behind voted step {v}")
        raise InconsistentReports(f"step {v} was voted but a survivor that applied {v - 1} does not hold its gradients")
    computed = max(grads, applied_max)
    tail = f"; in-flight step {v + 1} discarded" + (" (its reduced gradients were held)" if grads > v else "")
    if lowest_applied < v:
        decision = RecoveryDecision(v, v + 1, f"in-band: vote of step {v} completed; survivors at {v - 1} apply it now")
    elif v == 0:
        decision = RecoveryDecision(None, 1, "in-band: no step committed yet" + tail)
    else:
        decision = RecoveryDecision(None, v + 1, f"in-band: all survivors applied step {v}" + tail)
    return InBandDecision(decision, computed)
