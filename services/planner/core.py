"""The planner's decision: `plan(snapshot, incidents, policy, now) -> RecoveryPlan | Escalation |
NoPlan`, each carrying its reasons. Pure: no I/O, no wall clock (the caller passes `now`), no
randomness; the same input gives the same output, ids included.

Work that scales with the whole job is numpy array operations over a `PlanInput`; Python loops
run over incidents, faulty nodes and restarted ranks only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashrecovery.shared.keys import PLAN_ID_PREFIX
from flashrecovery.shared.replicas import choose_sources
from flashrecovery.shared.schemas import Escalation, Fallback, FaultIncident, RecoveryPlan, RepairAction
from flashrecovery.shared.settings import NoSparePolicy, PlannerSettings
from flashrecovery.shared.topology import JobSnapshot

from .arrays import PlanInput
from .placement import Group, place

PRODUCER = "planner"


# One source of defaults: the settings model (a plain pydantic model: building it reads no
# environment).
_S = PlannerSettings()


@dataclass(frozen=True)
class Policy:
    restart_in_place_for_software: bool = _S.restart_in_place_for_software
    no_spare_policy: NoSparePolicy = _S.no_spare_policy  # wait only: shrink is not implemented (PlannerSettings)
    quarantine_faults: int = _S.quarantine_faults
    quarantine_window_s: float = _S.quarantine_window_s
    # Last durable checkpoint. Only named in the escalation of a lost shard: no checkpoint
    # restore is implemented, so no CHECKPOINT plan is ever made.
    checkpoint_step: int | None = None
    producer: str = PRODUCER

    def __post_init__(self) -> None:
        if self.no_spare_policy != "wait":
            raise ValueError(f"no_spare_policy {self.no_spare_policy!r} is not supported yet: only 'wait'")

    @classmethod
    def from_settings(
        cls, s: PlannerSettings, *, checkpoint_step: int | None = None, producer: str = PRODUCER
    ) -> Policy:
        return cls(
            **{f: getattr(s, f) for f in PlannerSettings.model_fields},
            checkpoint_step=checkpoint_step,
            producer=producer,
        )


@dataclass(frozen=True)
class NoPlan:
    """Nothing to recover. `inert` names incidents that need no recovery at all (they name only
    nodes without active ranks): the shell may close them."""

    incident_ids: tuple[str, ...]
    reasons: tuple[str, ...]
    inert: tuple[str, ...] = ()


Decision = RecoveryPlan | Escalation | NoPlan
FaultHistory = Mapping[str, Mapping[str, float]]  # node id -> {incident id: fault time}


def plan_id_for(
    job_id: str, incident_ids: Iterable[str], target_generation: int, fallback: Fallback = Fallback.NONE
) -> str:
    """Deterministic: a replayed incident yields the same id. The fallback kind is part of it so
    a WAIT plan and the real plan made once capacity arrives do not collide."""
    text = f"{job_id}|{','.join(sorted(set(incident_ids)))}|{target_generation}|{fallback.value}"
    return PLAN_ID_PREFIX + hashlib.sha1(text.encode()).hexdigest()[:24]


def incident_refusal(incident: FaultIncident, job_id: str, generation: int) -> str | None:
    """Why an incident must not even be recorded, or None: another job's, or one from a
    generation the registry never reached (nobody detected it in a generation that does not
    exist yet: a forged or corrupt message). An older generation is still a real fault."""
    if incident.job_id != job_id:
        return f"other job {incident.job_id[:80]!r}"
    if incident.generation > generation:
        return f"generation {incident.generation} is ahead of the registry's {generation}"
    return None


def known_incident_refusal(record: Mapping[str, str]) -> str | None:
    """Why an incident the registry already holds must not be planned again, or None.

    Idempotency is by the incident's identity (its id, as recorded in the registry), not by the
    envelope that carries it: a detector re-emitting it, a second detector instance, or anyone
    who forges a copy under a new event id must not start a second recovery (a duplicate once
    re-killed a rank already recovered). The one incident planned again is one whose plan never
    got out (a planner stopped between recording the incident and publishing its plan): the plan
    id is derived from the incidents, so that replay is the same plan.
    record: the registry's incident hash (phase, plan_id, ...)."""
    phase = record.get("phase")
    if phase is None or (phase == "planned" and not record.get("plan_id")):
        return None
    if phase in ("done", "failed", "superseded"):
        return f"incident already ended ({phase})"
    if phase == "escalated":
        return "incident already escalated"
    if record.get("plan_id"):
        return f"incident already {phase} under plan {record['plan_id']}"
    return f"incident already {phase}"


def quarantined(incidents: Iterable[FaultIncident], history: FaultHistory, now: float, policy: Policy) -> set[str]:
    """Nodes with at least quarantine_faults distinct faults in the window ending at now. The
    history is keyed by incident id, so a replayed incident is not counted twice."""
    seen: dict[str, dict[str, float]] = {n: dict(v) for n, v in history.items()}
    for inc in incidents:
        for n in inc.root_cause_nodes:
            seen.setdefault(n, {})[inc.incident_id] = inc.detected_at
    lo = now - policy.quarantine_window_s
    return {n for n, faults in seen.items() if sum(1 for t in faults.values() if t >= lo) >= policy.quarantine_faults}


@dataclass
class _Faults:
    replace: set[int] = field(default_factory=set)  # node indices whose ranks all move
    proc: dict[int, set[int]] = field(default_factory=dict)  # node -> failed rank positions
    named: set[int] = field(default_factory=set)  # every known node an incident names
    contributed: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)


def _collect(inp: PlanInput, incidents: list[FaultIncident], handled: frozenset[str] = frozenset()) -> _Faults:
    """`handled`: the incidents of the plan being superseded, whose ranks it already restarted."""
    f = _Faults()
    for inc in incidents:
        iid = inc.incident_id
        nodes = [inp.node_index[n] for n in inc.root_cause_nodes if n in inp.node_index]
        unknown = [n for n in inc.root_cause_nodes if n not in inp.node_index]
        if unknown:
            f.reasons.append(f"{iid}: unknown nodes {unknown} ignored")
        f.named.update(nodes)
        pos = inp.positions(inc.root_cause_ranks)
        if (pos < 0).any():
            f.reasons.append(f"{iid}: unknown ranks {[r for r, p in zip(inc.root_cause_ranks, pos) if p < 0]} ignored")
        pos = pos[pos >= 0]
        if inc.action == RepairAction.REPLACE_NODE:
            nodes = nodes or sorted(set(inp.node_of[pos].tolist()))
            for n in nodes:
                if inp.ranks_on(n).size == 0:
                    f.reasons.append(f"{iid}: {inp.node_ids[n]} has no active ranks")
                    continue
                f.replace.add(n)
                f.contributed.add(iid)
        elif inc.action == RepairAction.RESTART_PROCESS:
            if pos.size == 0 and nodes:
                pos = np.concatenate([inp.ranks_on(n) for n in nodes])
                if pos.size:
                    f.reasons.append(
                        f"{iid}: no ranks named; restarting every rank of {[inp.node_ids[n] for n in nodes]}"
                    )
            if pos.size == 0:
                f.reasons.append(f"{iid}: names no active rank")
            # A rank a superseded plan already moved off the incident's node runs there as an
            # assigned standby: it is restored again (PlanInput.recovering), not restarted once
            # more (that killed the fresh standby and left the next rank a cold start in place).
            # So is a rank that plan restarted in place for this same incident: its process is
            # the node's standby, assigned (restarting it again killed it for a cold start).
            moved = [
                p
                for p in pos.tolist()
                if inp.recovering[p] and ((nodes and int(inp.node_of[p]) not in nodes) or iid in handled)
            ]
            if moved:
                f.reasons.append(
                    f"{iid}: ranks {inp.rank[moved].tolist()} already restarted by a "
                    "superseded plan: restored again, not restarted"
                )
            for p in pos.tolist():
                f.contributed.add(iid)
                if p not in moved:
                    f.proc.setdefault(int(inp.node_of[p]), set()).add(p)
        else:
            f.reasons.append(f"{iid}: action {inc.action.value}: nothing to restart")
    return f


def plan(
    snapshot: JobSnapshot | PlanInput,
    incidents: Iterable[FaultIncident],
    policy: Policy,
    now: float,
    *,
    fault_history: FaultHistory | None = None,
    active_plan: RecoveryPlan | None = None,
) -> Decision:
    """Decide the recovery for the union of open `incidents`. `active_plan` is the plan the
    executor is driving now, if any: the result then supersedes it. `fault_history` holds the
    earlier faults per node (from Redis) for quarantine.

    The steps, in order; `reasons` collects each step's explanation, in that order."""
    inp = snapshot if isinstance(snapshot, PlanInput) else PlanInput.from_snapshot(snapshot)
    incs, ids, reasons = _own_incidents(inp, incidents)
    new_ids, done = _new_incidents(ids, reasons, active_plan)
    if done is not None:
        return done
    faults = _collect(inp, incs, frozenset(active_plan.incident_ids) if active_plan is not None else frozenset())
    reasons += faults.reasons
    idle = _inert(ids, new_ids, faults, reasons, active_plan)
    if idle is not None:
        return idle
    quarantine, q_idx = _quarantine(inp, incs, faults, fault_history or {}, now, policy, reasons)
    restart, healthy, faulty_idx = _restart_set(inp, faults, reasons)
    moves, lacking = _placement(inp, faults, q_idx, faulty_idx, policy, reasons)
    draft = _Draft(
        inp, ids, now, policy, reasons, quarantine, faulty_idx, active_plan.plan_id if active_plan is not None else None
    )
    restart_pos = np.flatnonzero(restart)
    transfers, lost = choose_sources(inp, restart_pos, healthy)
    if lost:
        return draft.lost_shards(lost)
    if lacking:
        return draft.wait_for_capacity(lacking, restart_pos)
    return draft.recovery(moves, restart_pos, transfers)


def _own_incidents(
    inp: PlanInput,
    incidents: Iterable[FaultIncident],
) -> tuple[list[FaultIncident], tuple[str, ...], list[str]]:
    """This job's incidents, one per id, in id order (another job's are named and dropped)."""
    reasons: list[str] = []
    by_id: dict[str, FaultIncident] = {}
    for inc in sorted(incidents, key=lambda i: i.incident_id):
        if inc.job_id != inp.job_id:
            reasons.append(f"{inc.incident_id}: belongs to job {inc.job_id}, ignored")
        else:
            by_id.setdefault(inc.incident_id, inc)
    return list(by_id.values()), tuple(by_id), reasons


def _new_incidents(
    ids: tuple[str, ...],
    reasons: list[str],
    active_plan: RecoveryPlan | None,
) -> tuple[list[str], NoPlan | None]:
    """The incidents the active plan does not cover yet, or the NoPlan saying there are none."""
    if not ids:
        return [], NoPlan(ids, tuple(reasons + ["no incident for this job"]))
    covered = set(active_plan.incident_ids) if active_plan is not None else set()
    new_ids = [i for i in ids if i not in covered]
    if not new_ids:
        assert active_plan is not None
        return [], NoPlan(ids, tuple(reasons + [f"all incidents covered by active plan {active_plan.plan_id}"]))
    return new_ids, None


def _inert(
    ids: tuple[str, ...], new_ids: list[str], faults: _Faults, reasons: list[str], active_plan: RecoveryPlan | None
) -> NoPlan | None:
    """The NoPlan when no new incident names a node or rank with active work, else None."""
    inert = tuple(i for i in new_ids if i not in faults.contributed)
    if len(inert) < len(new_ids):
        return None
    why = (
        "incidents name no node or rank with active work"
        if active_plan is None
        else f"new incidents need no recovery; active plan {active_plan.plan_id} continues"
    )
    return NoPlan(ids, tuple(reasons + [why]), inert)


def _quarantine(
    inp: PlanInput,
    incs: list[FaultIncident],
    faults: _Faults,
    history: FaultHistory,
    now: float,
    policy: Policy,
    reasons: list[str],
) -> tuple[list[str], set[int]]:
    """A node faulting repeatedly leaves the job for good, so its ranks all move: its process
    restarts become a replacement. Returns (quarantined node ids, their indices)."""
    q_names = quarantined(incs, history, now, policy)
    quarantine = sorted(n for n in q_names if n in inp.node_index)
    q_idx = {inp.node_index[n] for n in quarantine}
    for name in quarantine:
        reasons.append(
            f"{name}: {policy.quarantine_faults}+ faults within {policy.quarantine_window_s:g}s: quarantined"
        )
    for n in sorted(set(faults.proc) & q_idx):
        faults.replace.add(n)
    for n in faults.replace:
        faults.proc.pop(n, None)
    return quarantine, q_idx


def _restart_set(
    inp: PlanInput,
    faults: _Faults,
    reasons: list[str],
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(restart mask over rank positions, healthy mask: may serve as a replica, faulty node
    indices). Ranks still recovering from a superseded plan are restarted again."""
    node_faulty = np.zeros(len(inp.node_ids), dtype=bool)
    faulty_idx = sorted(faults.replace | set(faults.proc))
    node_faulty[faulty_idx] = True
    restart = inp.recovering.copy()
    replace_pos = [inp.ranks_on(n) for n in sorted(faults.replace)]
    proc_pos = [np.fromiter(sorted(v), dtype=np.int64) for _, v in sorted(faults.proc.items())]
    for arr in replace_pos + proc_pos:
        restart[arr] = True
    if restart[inp.recovering].any():
        reasons.append(
            f"{int(inp.recovering.sum())} ranks still recovering from a superseded plan: restored again, not moved"
        )
    healthy = ~restart & ~node_faulty[inp.node_of]
    return restart, healthy, faulty_idx


def _placement(
    inp: PlanInput, faults: _Faults, q_idx: set[int], faulty_idx: list[int], policy: Policy, reasons: list[str]
) -> tuple[list[tuple[int, int, str]], list[Group]]:
    """Node replacements must move; software restarts move to a standby (or stay). A rank still
    recovering from a superseded plan moves again only if its current node is named now;
    otherwise it keeps its standby and only needs a source. Returns ((position, target node,
    mode) moves, groups that must move and found no room)."""
    in_place = policy.restart_in_place_for_software
    groups = [Group(n, tuple(int(p) for p in inp.ranks_on(n)), True) for n in sorted(faults.replace)]
    if not in_place:
        groups += [Group(n, tuple(sorted(v)), False) for n, v in sorted(faults.proc.items())]
    excluded = faults.named | q_idx | set(faulty_idx)
    placement = place(inp, groups, excluded)
    reasons += placement.reasons
    moves: list[tuple[int, int, str]] = [(p, t, "standby") for p, t in placement.target.items()]
    stay = [n for n in faults.proc] if in_place else []
    for g in placement.unplaced:
        if not g.must_move:
            stay.append(g.node)
            reasons.append(
                f"{inp.node_ids[g.node]}: no standby slot for {len(g.positions)} "
                "restarted processes: restarting in place"
            )
    for n in sorted(set(stay)):
        moves += [(p, n, "in_place") for p in sorted(faults.proc[n])]
    return moves, [g for g in placement.unplaced if g.must_move]


class _Draft:
    """What every outcome of one plan() call shares (ids, generation, superseded plan, faulty
    and quarantined nodes, the reasons so far), and the three outcomes."""

    def __init__(
        self,
        inp: PlanInput,
        ids: tuple[str, ...],
        now: float,
        policy: Policy,
        reasons: list[str],
        quarantine: list[str],
        faulty_idx: list[int],
        supersedes: str | None,
    ) -> None:
        self.inp, self.ids, self.now, self.policy = inp, ids, now, policy
        self.reasons, self.quarantine, self.supersedes = reasons, quarantine, supersedes
        self.target_gen = inp.generation + 1
        self.next_step = inp.committed_step + 1
        self.faulty_nodes = tuple(inp.node_ids[n] for n in faulty_idx)
        if supersedes:
            reasons.append(f"supersedes {supersedes}: covers {len(ids)} open incidents")

    def lost_shards(self, lost: list[int]) -> Escalation:
        """Nothing alive holds these shards' state and no checkpoint restore is implemented: a
        plan could only end in a job that resumes with missing state. Say so instead."""
        inp, policy = self.inp, self.policy
        ck = "unknown" if policy.checkpoint_step is None else str(policy.checkpoint_step)
        why = "; ".join(f"every replica of shard {s} lost and no checkpoint restore is implemented" for s in lost)
        return Escalation(
            event_id=plan_id_for(inp.job_id, self.ids, self.target_gen, Fallback.CHECKPOINT).replace(
                PLAN_ID_PREFIX, "esc-"
            ),
            job_id=inp.job_id,
            generation=inp.generation,
            emitted_at=self.now,
            producer=policy.producer,
            incident_ids=self.ids,
            reason="; ".join(
                [*self.reasons, f"{why} (last durable checkpoint step {ck}): restart the job from its checkpoint"]
            ),
        )

    def wait_for_capacity(self, lacking: list[Group], restart_pos: np.ndarray) -> RecoveryPlan:
        inp = self.inp
        need = sum(len(g.positions) for g in lacking)
        names = [inp.node_ids[g.node] for g in lacking]
        self.reasons.append(f"no spare capacity: {need} standby slots needed for {names}; waiting for capacity")
        return self._build(
            Fallback.WAIT,
            restart_ranks=restart_pos,
            replacements=[],
            transfers=[],
            groups_=rebuild_groups(inp, restart_pos),
        )

    def recovery(
        self, moves: list[tuple[int, int, str]], restart_pos: np.ndarray, transfers: list[dict[str, int]]
    ) -> RecoveryPlan:
        # Plain dicts: the plan model validates them all in one (compiled) pass, much cheaper than
        # one model object per restarted rank.
        inp = self.inp
        moves = sorted(moves)
        at = np.fromiter((m[0] for m in moves), dtype=np.int64, count=len(moves))
        replacements = [
            {"rank": r, "from_node": inp.node_ids[f], "to_node": inp.node_ids[t], "local_rank": lr, "mode": mode}
            for r, f, lr, (_, t, mode) in zip(
                inp.rank[at].tolist(), inp.node_of[at].tolist(), inp.local_rank[at].tolist(), moves
            )
        ]
        groups_ = rebuild_groups(inp, restart_pos)
        self.reasons.append(
            f"restart {restart_pos.size} ranks on {len(self.faulty_nodes)} faulty nodes, "
            f"resume at step {self.next_step}"
        )
        return self._build(
            Fallback.NONE, restart_ranks=restart_pos, replacements=replacements, transfers=transfers, groups_=groups_
        )

    def _build(
        self,
        fallback: Fallback,
        *,
        restart_ranks: np.ndarray,
        replacements: list[dict[str, Any]],
        transfers: list[dict[str, int]],
        groups_: tuple[str, ...],
    ) -> RecoveryPlan:
        inp = self.inp
        pid = plan_id_for(inp.job_id, self.ids, self.target_gen, fallback)
        return RecoveryPlan(
            event_id=pid,
            job_id=inp.job_id,
            generation=inp.generation,
            emitted_at=self.now,
            producer=self.policy.producer,
            plan_id=pid,
            incident_ids=self.ids,
            supersedes=self.supersedes,
            target_generation=self.target_gen,
            world_size=inp.world_size,
            restart_ranks=tuple(inp.rank[restart_ranks].tolist()),
            faulty_nodes=self.faulty_nodes,
            replacements=tuple(replacements),
            transfers=tuple(transfers),
            recovery_step=self.next_step,
            rebuild_groups=groups_,
            quarantine_nodes=tuple(self.quarantine),
            fallback=fallback,
            steps_lost_estimate=0,
            reasons=tuple(self.reasons),
        )


def rebuild_groups(inp: PlanInput, restart_pos: np.ndarray) -> tuple[str, ...]:
    """The communication groups that change: global, plus each dp/tp/pp group holding a
    restarted rank. Bounded by the restarted ranks, never by the job size."""
    if restart_pos.size == 0:
        return ()
    out = ["global"]
    if inp.dp > 1:
        out += [f"dp:shard={s}" for s in np.unique(inp.shard[restart_pos]).tolist()]
    d, t, p = inp.dp_of[restart_pos], inp.tp_of[restart_pos], inp.pp_of[restart_pos]
    if inp.tp > 1:
        if inp.pp > 1:
            out += [f"tp:dp={a},pp={b}" for a, b in sorted(set(zip(d.tolist(), p.tolist())))]
        else:
            out += [f"tp:dp={a}" for a in np.unique(d).tolist()]
    if inp.pp > 1:
        out += [f"pp:dp={a},tp={b}" for a, b in sorted(set(zip(d.tolist(), t.tolist())))]
    return tuple(out)
