"""Table-driven tests of the exactly-once commit rule (shared/commit_rule.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashrecovery.shared.channel import Paused
from flashrecovery.shared.commit_rule import (
    InconsistentReports,
    decide_recovery,
)


def rep(rank: int, applied: int, grads: int | None, vote: int) -> Paused:
    return Paused(rank=rank, generation=0, applied_step=applied, grads_step=grads, vote_step=vote)


# (name, reports as (rank, applied, grads, vote), expected commit_step, expected resume_step)
CASES = [
    ("before any step", [(0, 0, None, 0), (1, 0, None, 0)], None, 1),
    ("first step in forward", [(0, 0, None, 0), (1, 0, None, 0), (3, 0, None, 0)], None, 1),
    ("between steps", [(0, 11, 11, 11), (1, 11, 11, 11)], None, 12),
    (
        "in forward of 12 (grads zeroed, stale grads_step kept)",
        [(0, 11, 11, 11), (1, 11, 11, 11), (3, 11, 11, 11)],
        None,
        12,
    ),
    (
        "partial gradient: some finished dp sync of 12, none voted",
        [(0, 11, 12, 11), (1, 11, 11, 11), (3, 11, 12, 11)],
        None,
        12,
    ),
    ("all finished dp sync of 12, vote never completed", [(0, 11, 12, 11), (1, 11, 12, 11)], None, 12),
    (
        "partial vote: one survivor completed vote 12 and applied it",
        [(0, 12, 12, 12), (1, 11, 12, 11), (3, 11, 12, 11)],
        12,
        13,
    ),
    ("partial vote: one survivor completed vote 12, not applied yet", [(0, 11, 12, 12), (1, 11, 12, 11)], 12, 13),
    ("all voted 12, some applied", [(0, 12, 12, 12), (1, 11, 12, 12), (3, 12, 12, 12)], 12, 13),
    ("all applied 12, some already in sync of 13", [(0, 12, 13, 12), (1, 12, 12, 12)], None, 13),
    ("single survivor lagging", [(5, 29, 30, 29), (6, 30, 30, 30)], 30, 31),
]


@pytest.mark.unit
@pytest.mark.parametrize("name,reports,commit,resume", CASES, ids=[c[0] for c in CASES])
def test_decide_recovery(
    name: str, reports: list[tuple[int, int, int | None, int]], commit: int | None, resume: int
) -> None:
    d = decide_recovery([rep(*r) for r in reports])
    assert (d.commit_step, d.resume_step) == (commit, resume), d.reason
    assert d.reason


BAD = [
    ("no reports", []),
    ("duplicate rank", [(0, 3, 3, 3), (0, 3, 3, 3)]),
    ("applied without vote", [(0, 4, 4, 3)]),
    ("voted two ahead of applied", [(0, 3, 5, 5)]),
    ("lagging two steps behind the vote", [(0, 12, 12, 12), (1, 10, 11, 10)]),
    ("voted step but lagging rank lacks its gradients", [(0, 12, 12, 12), (1, 11, 11, 11)]),
]


@pytest.mark.unit
@pytest.mark.parametrize("name,reports", BAD, ids=[b[0] for b in BAD])
def test_inconsistent_reports(name: str, reports: list[tuple[int, int, int | None, int]]) -> None:
    with pytest.raises(InconsistentReports):
        decide_recovery([rep(*r) for r in reports])


@pytest.mark.unit
def test_order_of_reports_does_not_matter() -> None:
    reps = [rep(0, 12, 12, 12), rep(1, 11, 12, 11), rep(3, 11, 12, 11)]
    assert decide_recovery(reps) == decide_recovery(list(reversed(reps)))


@st.composite
def consistent_reports(draw: st.DrawFn) -> tuple[list[Paused], int, int]:
    """Survivor states reachable by the protocol around in-flight step s = v + 1."""
    v = draw(st.integers(min_value=0, max_value=50))
    ranks = draw(st.lists(st.integers(0, 63), min_size=1, max_size=12, unique=True))
    vote_done_somewhere = v >= 1 and draw(st.booleans())
    out = []
    for r in ranks:
        if vote_done_somewhere:
            # every rank entered vote v: it holds grads of v; it may have completed/applied it
            state = draw(st.sampled_from(["in_vote", "voted", "applied", "next_sync"]))
            out.append(
                {
                    "in_vote": rep(r, v - 1, v, v - 1),
                    "voted": rep(r, v - 1, v, v),
                    "applied": rep(r, v, v, v),
                    "next_sync": rep(r, v, v + 1, v),
                }[state]
            )
        else:
            state = draw(st.sampled_from(["idle", "synced_next"]))
            grads = v if v else None
            out.append(rep(r, v, grads, v) if state == "idle" else rep(r, v, v + 1, v))
    if vote_done_somewhere and all(p.vote_step < v for p in out):
        out[0] = rep(out[0].rank, v - 1, v, v)  # someone completed the vote
    return out, v, int(vote_done_somewhere)


@pytest.mark.unit
@given(consistent_reports())
def test_property_exactly_once(data: tuple[list[Paused], int, int]) -> None:
    reports, v, _ = data
    d = decide_recovery(reports)
    # resume right after the highest step any survivor may have applied: nothing lost
    assert d.resume_step == max(p.vote_step for p in reports) + 1
    assert d.resume_step - 1 >= max(p.applied_step for p in reports)
    # the commit step is applied at most once: only lagging ranks holding its grads apply it
    if d.commit_step is not None:
        assert d.commit_step == d.resume_step - 1
        for p in reports:
            assert p.applied_step == d.commit_step or (
                p.applied_step == d.commit_step - 1 and p.grads_step == d.commit_step
            )
    else:
        assert all(p.applied_step == d.resume_step - 1 for p in reports)


def test_reasons_stay_short_at_100k_ranks():
    from flashrecovery.shared.commit_rule import ranks_text

    assert ranks_text([1, 2, 3]) == "[1, 2, 3]"
    assert ranks_text(list(range(100_000))) == "[0, 1, 2, 3, 4, 5, 6, 7, ... 100000 ranks]"


# ------------------------------------------------ the in-band decision (issue #14 item 2)
@st.composite
def report_sets(draw):
    """Survivor rows around a step s, consistent or not (one rank a step off, grads of another
    step), and a shuffler for the order the allreduce would combine them in."""
    s = draw(st.integers(0, 5))
    n = draw(st.integers(1, 24))
    ranks = draw(st.permutations(range(64)))[:n]
    rows = []
    for r in ranks:
        applied = draw(st.sampled_from([max(0, s - 1), s, s + 1]))
        vote = draw(st.sampled_from([applied, applied + 1, max(0, applied - 1)]))
        grads = draw(st.sampled_from([None, applied, applied + 1, vote]))
        rows.append((r, applied, grads, vote))
    return rows, draw(st.randoms(use_true_random=False))


def _verdict(decide):
    try:
        d = decide()
    except InconsistentReports:
        return ("refused",)
    return ("decided", d.commit_step, d.resume_step)


@given(report_sets(), st.lists(st.integers(64, 80), max_size=4, unique=True))
def test_the_in_band_reduction_decides_as_the_rows_do(case, restarting) -> None:
    """Every survivor contributes its row, the restarted ranks the neutral one, in any order; the
    element-wise MAX (what the allreduce computes) gives the rule's commit and resume steps, and
    a refusal exactly where the rule refuses."""
    from flashrecovery.shared.commit_rule import combine_in_band, decide_from_rows, decide_in_band, in_band_row

    rows, rnd = case
    contributions = [in_band_row(r, a, g, v, restarting=False) for r, a, g, v in rows]
    contributions += [in_band_row(r, 0, None, 0, restarting=True) for r in restarting]
    rnd.shuffle(contributions)
    reduced = combine_in_band(contributions)
    assert _verdict(lambda: decide_in_band(reduced).decision) == _verdict(lambda: decide_from_rows(rows))
    if _verdict(lambda: decide_from_rows(rows))[0] == "decided":
        computed = max(max(a, g or 0) for _, a, g, _ in rows)
        assert decide_in_band(reduced).computed_step == computed


def test_the_in_band_decision_refuses_with_only_restarted_ranks_and_names_a_bad_rank() -> None:
    from flashrecovery.shared.commit_rule import combine_in_band, decide_in_band, in_band_row

    with pytest.raises(InconsistentReports, match="no survivor reports"):
        decide_in_band(combine_in_band([in_band_row(3, 0, None, 0, restarting=True)]))
    rows = [in_band_row(5, 12, 12, 11, restarting=False), in_band_row(2, 12, 12, 11, restarting=False)]
    with pytest.raises(InconsistentReports, match="rank 2 reported"):
        decide_in_band(combine_in_band(rows))
    ok = combine_in_band([in_band_row(0, 12, 12, 12, False), in_band_row(1, 11, 12, 11, False)])
    assert decide_in_band(ok).decision.commit_step == 12
    assert decide_in_band(ok).decision.resume_step == 13
