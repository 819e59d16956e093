"""The executor's decisions, pure: which nodes each phase waits for, whether a phase is done,
should retry or has failed, and the topology after a plan is applied.

Phases of one plan:  fence -> pause -> replace -> rebuild -> restore -> resume -> verify -> done
(or failed / superseded). `rebuild`, `restore`, `resume` and `verify` are stages of the single
RECOVER broadcast: the sidecars report each stage per node, so there is no extra round trip
between them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flashrecovery.shared.schemas import CommandAck, Fallback, NodeRole, RankState, RecoveryPlan
from flashrecovery.shared.topology import NodeRecord, RankRecord

PHASES = ("fence", "pause", "replace", "rebuild", "restore", "resume", "verify")
RECOVER_STAGES = {"rebuild": "rebuilt", "restore": "restored", "resume": "resumed", "verify": "verified"}
TERMINAL = ("done", "failed", "superseded")


def next_phase_name(phase: str) -> str:
    i = PHASES.index(phase)
    return PHASES[i + 1] if i + 1 < len(PHASES) else "done"


@dataclass(frozen=True)
class Waitlist:
    pause: frozenset[str]  # nodes hosting surviving ranks: their pause reports decide the commit
    replace: frozenset[str]  # nodes receiving replacements (must ack)
    recover: frozenset[str]  # nodes hosting ranks after the plan (every one must verify)
    # Nodes that report the RECOVER stages (rebuilt, restored, resumed, verified): the ones
    # hosting a restarted rank or a transfer's end. The rest report only a failure. Collectives
    # over the whole new group make a few reports speak for everyone: the rebuild ends in an
    # allreduce, so one node's `rebuilt` means every member joined; a restore moves state only
    # between a transfer's ends; and a step is applied only after its commit vote, an allreduce
    # over every rank, completed, so one node's `verified` (resume step applied) means every
    # rank resumed and reached that vote. Acks per recovery: one per node (the pause reports,
    # which decide the commit) plus four per stage node, instead of five per node.
    stages: frozenset[str]
    # With the in-band decision (executor.in_band_commit) only the nodes that hosted a rank
    # being replaced report the pause: the kill is confirmed and the replaced ranks' last step
    # reports come back (to judge lost steps). Every other survivor decides the commit with the
    # rest in the rebuild's allreduce, and reports a pause only if it failed there.
    pause_reporters: frozenset[str] = frozenset()


def waitlist(plan: RecoveryPlan, rank_nodes: Mapping[int, str]) -> Waitlist:
    """rank_nodes: every rank's node before the plan (Registry.versioned_rank_nodes(); no pydantic object
    per rank). Work proportional to the cluster only in this set arithmetic; commands are
    broadcasts and acks come one per node."""
    restart = set(plan.restart_ranks)
    survivors = {node for rank, node in rank_nodes.items() if rank not in restart}
    dest = {rep.to_node for rep in plan.replacements}
    moved = {rep.rank: rep.to_node for rep in plan.replacements}
    # A rank left `recovering` by a superseded plan stays where it is and is restored again.
    staying = {node for rank, node in rank_nodes.items() if rank not in moved}

    def after(rank: int) -> str | None:
        return moved.get(rank) or rank_nodes.get(rank)

    ends = restart | {t.src for t in plan.transfers} | {t.dst for t in plan.transfers}
    recover = frozenset(staying | dest)
    stages = frozenset(n for n in map(after, ends) if n is not None) & recover
    replaced_from = frozenset(n for n in (rank_nodes.get(r) for r in moved) if n is not None)
    return Waitlist(
        pause=frozenset(survivors),
        replace=frozenset(dest),
        recover=recover,
        stages=stages or recover,
        pause_reporters=replaced_from,
    )


@dataclass(frozen=True)
class InBandOutcome:
    commit_step: int | None
    resume_step: int
    computed_step: int


def in_band_outcome(rows: Iterable[tuple[int | None, int | None, int | None]]) -> InBandOutcome | str:
    """The decision the ranks reached in-band, from the stage nodes' `rebuilt` rows
    (commit_step, resume_step, computed_step), or why it cannot be read. Every rank read it off
    the same reduced vector, so any two rows that differ are a bug, not a tie to break."""
    seen = {row for row in rows if row[1] is not None}
    if not seen:
        return "no rank reported the in-band decision"
    if len(seen) > 1:
        return f"ranks reported different in-band decisions: {sorted(seen, key=str)[:4]}"
    commit, resume, computed = seen.pop()
    assert resume is not None
    return InBandOutcome(commit, resume, resume - 1 if computed is None else computed)


def touched_nodes(plan: RecoveryPlan) -> set[str]:
    """The nodes whose records applied_topology may rewrite: the shell reads only these."""
    return (
        {rep.from_node for rep in plan.replacements}
        | {rep.to_node for rep in plan.replacements}
        | set(plan.quarantine_nodes)
    )


def ranks_to_kill(plan: RecoveryPlan) -> tuple[int, ...]:
    """Only the ranks being replaced are killed (moved, or restarted in place): a rank that is
    merely restored again (left recovering by a superseded plan) already runs on its new node
    and must be kept."""
    return tuple(sorted(rep.rank for rep in plan.replacements))


@dataclass(frozen=True)
class PhaseVerdict:
    outcome: str  # wait | advance | retry | fail
    reason: str


def judge(
    acks: Mapping[str, CommandAck],
    expected: frozenset[str],
    started_at: float,
    now: float,
    timeout_s: float,
    attempt: int,
    retries: int,
    fail_from: frozenset[str] | None = None,
) -> PhaseVerdict:
    """acks: node -> its ack for this phase's command (and stage). A negative ack from a node
    in `fail_from` (default: `expected`) fails the phase, even from a node not waited for."""
    fail_from = expected if fail_from is None else fail_from
    bad = sorted(n for n, a in acks.items() if (n in expected or n in fail_from) and not a.ok)
    missing = sorted(expected - acks.keys())
    if not bad and not missing:
        return PhaseVerdict("advance", f"all {len(expected)} nodes acknowledged")
    if bad:
        why = "; ".join(f"{n}: {acks[n].detail}" for n in bad)
        return PhaseVerdict("retry" if attempt < retries else "fail", f"negative acks: {why}")
    if now - started_at > timeout_s:
        why = f"no ack after {timeout_s:.0f}s from {missing[:10]}{'...' if len(missing) > 10 else ''}"
        return PhaseVerdict("retry" if attempt < retries else "fail", why)
    return PhaseVerdict("wait", f"waiting for {len(missing)} nodes")


def resend_due(verdict: PhaseVerdict, last_sent_at: float, now: float, resend_s: float) -> bool:
    """Whether a phase still waiting for acks sends its command again now. A command can be lost
    on the bus (a restarted broker that kept no topics, a consumer repositioned past it); the
    same command id again costs a sidecar that already acted only a replay of its acks
    (sidecar CommandGate), while one that never saw it acts. resend_s 0: only on timeout."""
    return verdict.outcome == "wait" and resend_s > 0 and now - last_sent_at >= resend_s


def applied_topology(
    plan: RecoveryPlan, ranks_by_id: Mapping[int, RankRecord], nodes_by_id: Mapping[str, NodeRecord], generation: int
) -> tuple[list[RankRecord], list[NodeRecord]]:
    """Registry records to write once replacements are up: only the moved ranks and the nodes
    whose membership changed, so the write grows with the restart set, not the cluster.
    ranks_by_id / nodes_by_id: the records of (at least) the moved ranks and touched_nodes()."""
    by_rank = ranks_by_id
    ranks = [
        by_rank[rep.rank].model_copy(
            update={
                "node_id": rep.to_node,
                "local_rank": rep.local_rank,
                "state": RankState.RECOVERING,
                "generation": generation,
                "pid": None,
            }
        )
        for rep in plan.replacements
    ]
    touched: dict[str, NodeRecord] = {}
    moved_from: dict[str, set[int]] = {}
    for rep in plan.replacements:
        moved_from.setdefault(rep.from_node, set()).add(rep.rank)
    for node_id, gone in moved_from.items():
        n = nodes_by_id.get(node_id)
        if n is None:
            continue
        left = tuple(r for r in n.ranks if r not in gone)
        quarantine = node_id in plan.quarantine_nodes or (not left and node_id in plan.faulty_nodes)
        touched[node_id] = n.model_copy(update={"ranks": left, "role": NodeRole.QUARANTINED if quarantine else n.role})
    for rep in plan.replacements:
        n = touched.get(rep.to_node) or nodes_by_id[rep.to_node]
        hosted = tuple(sorted(set(n.ranks) | {rep.rank}))
        slots = max(0, n.standby_slots - 1) if rep.to_node != rep.from_node else n.standby_slots
        role = n.role if slots > 0 else NodeRole.ACTIVE
        touched[rep.to_node] = n.model_copy(update={"ranks": hosted, "standby_slots": slots, "role": role})
    for node_id in plan.quarantine_nodes:
        if node_id in nodes_by_id and node_id not in touched:
            touched[node_id] = nodes_by_id[node_id].model_copy(update={"role": NodeRole.QUARANTINED})
    return ranks, list(touched.values())


def cannot_proceed(plan: RecoveryPlan) -> str | None:
    """Why a plan must stop once its survivors are paused, or None. A WAIT plan has no place for
    its restart set: rebuilding without those ranks could only time out, so the job is held
    paused (fenced, consistent) until a new plan brings capacity."""
    if plan.fallback == Fallback.WAIT:
        return (
            f"waiting for capacity: ranks {list(plan.restart_ranks)[:10]} have no place; survivors "
            f"stay paused until a new plan"
        )
    return None


def settled(records: list[RankRecord]) -> list[RankRecord]:
    """The restart set's records once a plan is done: `recovering` ranks are running again (left
    recovering, the next plan would take them for leftovers of a superseded plan and restore
    them once more)."""
    return [r.model_copy(update={"state": RankState.RUNNING}) for r in records if r.state == RankState.RECOVERING]


# ---------------------------------------------------------------------------- which plan runs
@dataclass(frozen=True)
class PlanChoice:
    drive: RecoveryPlan | None  # the one plan to drive now, or None
    # Plans that must never run (again): (plan, outcome, reason); outcome is superseded when a
    # newer plan covers all its incidents, else failed (it escalates: nothing else will act).
    retire: tuple[tuple[RecoveryPlan, str, str], ...]


def covered_by(plan: RecoveryPlan, plans: Iterable[RecoveryPlan]) -> RecoveryPlan | None:
    """A newer plan (same or later target generation) that carries every incident of `plan`."""
    mine = set(plan.incident_ids)
    newer = [q for q in plans if q.plan_id != plan.plan_id and _age(q) > _age(plan) and mine <= set(q.incident_ids)]
    return max(newer, key=_age, default=None)


def superseded_id(plan: RecoveryPlan, plans: Iterable[RecoveryPlan]) -> str | None:
    """The plan `plan` replaces: the one it names, else the newest older plan made against the
    same generation whose incidents it all carries. The planner names the plan the executor is
    driving; a plan it made a moment before the executor started the other cannot name it, yet
    replaces it just the same (measured: two ranks on two nodes killed at once, plan A for one
    started, plan B for both arrived during A's pause, was refused as stale, and A, which could
    not rebuild without B's rank, failed: the job escalated)."""
    if plan.supersedes:
        return plan.supersedes
    mine = set(plan.incident_ids)
    older = [
        q
        for q in plans
        if q.plan_id != plan.plan_id
        and q.target_generation == plan.target_generation
        and _age(q) < _age(plan)
        and set(q.incident_ids) <= mine
    ]
    return max(older, key=_age).plan_id if older else None


def _age(plan: RecoveryPlan) -> tuple[int, float, str]:
    return plan.target_generation, plan.emitted_at, plan.plan_id


def select_plan(plans: Iterable[RecoveryPlan], runs: Mapping[str, Mapping[str, str]], generation: int) -> PlanChoice:
    """The newest plan that may still run, and every plan that never may.

    runs: plan id -> its run state (phase, generation once fenced, ...; absent or empty: never
    started); generation: the registry's now. A plan another replaces (superseded_id) never
    runs; nor does a plan not yet started that may not fence (fence_refusal: the registry left
    the generation it was made against, e.g. a newer plan fenced or finished since), nor a
    started one whose fence a newer plan's fence followed. Of the rest only the newest runs;
    the others are retired, started or not: two plans made from one generation must not both
    run."""
    plans = list(plans)
    replaces = {p.plan_id: superseded_id(p, plans) for p in plans}
    named = {old: p for p, old in replaces.items() if old}
    live: list[RecoveryPlan] = []
    stale: list[tuple[RecoveryPlan, str]] = []
    for p in plans:
        run = runs.get(p.plan_id) or {}
        phase = run.get("phase")
        if phase in TERMINAL:
            continue
        why = None
        if p.plan_id in named:
            why = f"superseded by {named[p.plan_id]}"
        elif phase is None:
            old = replaces[p.plan_id]
            why = fence_refusal(p, generation, runs.get(old) if old else None)
        elif "generation" in run and int(run["generation"]) < generation:
            why = f"fenced generation {run['generation']}, registry moved on to {generation}"
        if why is None:
            live.append(p)
        else:
            stale.append((p, why))
    drive = max(live, key=_age, default=None)
    if drive is not None:
        stale += [(p, f"not the newest plan: {drive.plan_id} is") for p in live if p is not drive]
    retire = []
    for p, why in stale:
        cover = covered_by(p, plans)
        retire.append(
            (
                p,
                "superseded" if cover is not None else "failed",
                why if cover is not None else f"{why}; no newer plan covers its incidents",
            )
        )
    return PlanChoice(drive, tuple(retire))


def fence_refusal(plan: RecoveryPlan, generation: int, superseded_run: Mapping[str, str] | None) -> str | None:
    """Why `plan` must not fence now, or None. A plan was made against generation
    target_generation - 1 and holds only if the registry is still there. One exception: a plan
    that supersedes a running one may have been made a moment before that one's own fence moved
    the generation; as long as the superseded run has written no topology, the registry holds
    nothing this plan did not see (superseded_run: that run's state, or None)."""
    base = plan.target_generation - 1
    if generation == base:
        return None
    if (
        superseded_run is not None
        and "topology_written" not in superseded_run
        and superseded_run.get("snapshot_generation") == str(base)
        and superseded_run.get("generation") == str(generation)
    ):
        return None
    return f"stale plan: made against generation {base}, registry at {generation}"


# ---------------------------------------------------------------------------- is the plan sound
def named_nodes(plan: RecoveryPlan) -> set[str]:
    """Every node a plan names: the shell reads only these records to check it."""
    return touched_nodes(plan) | set(plan.faulty_nodes)


def identity_refusal(plan: RecoveryPlan, stored: RecoveryPlan | None) -> str | None:
    """Whether `plan` is the one the planner recorded under its id (Registry.put_plan_once,
    written before the plan is published): anything else on the plans topic is not a plan."""
    if stored is None:
        return f"plan {plan.plan_id[:80]!r} is not in the registry: the planner did not make it"
    if stored.model_dump(mode="json") != plan.model_dump(mode="json"):
        return f"plan {plan.plan_id[:80]!r} differs from the one the planner recorded under its id"
    return None


def plan_refusal(
    plan: RecoveryPlan,
    *,
    generation: int,
    world_size: int,
    rank_nodes: Mapping[int, str],
    nodes_by_id: Mapping[str, NodeRecord],
    stored: RecoveryPlan | None,
) -> str | None:
    """Why `plan` must not be driven at all, or None: checked against the registry before its
    first command, so an invalid plan never touches the job (one with restart_ranks [10^9] and
    world size -1 was once fenced, paused and replaced, failed at rebuild and left the job
    paused). The registry's view: its generation and world size, every rank's node
    (rank_nodes), the records of the nodes the plan names (named_nodes; absent = unknown), and
    the plan the planner recorded under this plan id before publishing it (stored)."""

    def some(xs: Iterable[object]) -> str:
        xs = list(xs)
        return f"{xs[:5]}{'...' if len(xs) > 5 else ''}"

    why = identity_refusal(plan, stored)
    if why is not None:
        return why
    if plan.target_generation - 1 > generation:
        return f"plan made against generation {plan.target_generation - 1}, ahead of the registry's {generation}"
    if plan.world_size != world_size or world_size <= 0:
        return f"world size {plan.world_size} does not match the registry's {world_size}"
    if not plan.restart_ranks:
        return "no rank to restart"
    unknown = [r for r in plan.restart_ranks if r not in rank_nodes]
    if unknown:
        return f"restart ranks not in the topology: {some(unknown)}"
    restart = set(plan.restart_ranks)
    if len(restart) != len(plan.restart_ranks):
        return "a rank is restarted twice"
    missing = sorted(n for n in named_nodes(plan) if n not in nodes_by_id)
    if missing:
        return f"nodes not in the registry: {some(missing)}"
    seen: set[int] = set()
    for rep in plan.replacements:
        if rep.rank not in restart:
            return f"replacement of rank {rep.rank}, which the plan does not restart"
        if rep.rank in seen:
            return f"rank {rep.rank} replaced twice"
        seen.add(rep.rank)
        if rep.local_rank < 0:
            return f"replacement of rank {rep.rank} with local rank {rep.local_rank}"
        if rep.mode == "in_place" and rep.to_node != rep.from_node:
            return f"in-place replacement of rank {rep.rank} moves it from {rep.from_node} to {rep.to_node}"
        if nodes_by_id[rep.to_node].role is NodeRole.QUARANTINED:
            return f"rank {rep.rank} replaced onto quarantined node {rep.to_node}"
    for t in plan.transfers:
        if t.src not in rank_nodes or t.dst not in rank_nodes:
            return f"transfer {t.src} -> {t.dst} names a rank not in the topology"
        if t.src in restart:
            return f"transfer source {t.src} is itself restarted"
        if t.dst not in restart:
            return f"transfer into rank {t.dst}, which the plan does not restart"
    return None
