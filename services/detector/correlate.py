"""Correlation: root causes and their symptoms. Root incidents are emitted here (one per node
and generation; later evidence joins it), held symptoms are attributed to a root seen before or
after them, evidence of an old generation joins that generation's incident, and the job moves
to a new generation (`advance`). Called by classify, timers and peers; pure."""

from __future__ import annotations

from typing import Any

from flashrecovery.shared.schemas import Evidence, FaultClass, RepairAction

from .config import PRIOR_GENERATIONS, Config, Decision, incident_id
from .state import INF, Incident, JobState, Symptom


def advance(job: JobState, generation: int, now: float, out: list[Decision]) -> None:
    """The job moved on (a recovery finished): rank data and held evidence of the old
    generation no longer describe the job."""
    old = job.generation
    job.generation = generation
    job.due[:] = INF
    # Held exits stay: a dead rank is dead in the new generation too (tick restarts it).
    dropped = sum(1 for s in job.pending if s.generation < generation and not s.is_exit)
    job.pending = [s for s in job.pending if s.generation >= generation or s.is_exit]
    job.headers = {k: v for k, v in job.headers.items() if v[2] >= generation}
    job.comm_recent.clear()
    job.hang_held = None
    # Kept for the late symptoms of the faults being recovered: survivors' errors about the dead
    # peer can reach us after the pause, stamped with the new generation.
    job.prior_roots = [
        r for r in job.prior_roots + job.roots if generation - PRIOR_GENERATIONS <= r.generation < generation
    ]
    job.advanced_at = now
    job.roots = [r for r in job.roots if r.generation >= generation]
    if job.comm_open is not None and job.comm_open.generation < generation:
        job.comm_open = None
    for key in [k for k in job.by_node if k[0] < generation - 1]:
        del job.by_node[key]
    for iid in [k for k, v in job.incidents.items() if v.generation < generation - 1]:
        del job.incidents[iid]
    out.append(
        Decision(
            "dropped", job.job_id, generation, f"generation {old} -> {generation}; {dropped} held symptoms dropped"
        )
    )


def evidence_gen(job: JobState, gen: int, now: float, out: list[Decision]) -> bool:
    """True when evidence of generation `gen` is current; handles newer and older ones."""
    if gen > job.generation:
        advance(job, gen, now, out)
    return gen == job.generation


def late_evidence(
    job: JobState,
    gen: int,
    node_id: str,
    rank: int | None,
    ev: Evidence,
    now: float,
    cfg: Config,
    out: list[Decision],
    *,
    dead: bool = False,
) -> None:
    """Evidence of a generation older than the job's: it joins that generation's incident of its
    node, else the root incident of that generation nearest in time. A rank that died then and
    that no incident restarts is dead now too: it becomes an incident of the current generation
    (else the recovery under way waits for it forever)."""
    if dead and rank is not None:
        cover = restarting(job, gen, node_id, rank) or restarting(job, job.generation, node_id, rank)
        if cover is None:
            emit_root(
                job,
                FaultClass.PROCESS_CRASH,
                RepairAction.RESTART_PROCESS,
                node_id,
                (rank,),
                now,
                [ev],
                1.0,
                f"rank {rank} on {node_id} died in generation {gen} (reported "
                f"after the job moved to {job.generation}); no incident restarts it",
                now,
                cfg,
                out,
            )
        else:
            join(cover, ev, out, "late exit of a rank already being restarted")
        return
    inc = job.by_node.get((gen, node_id))
    if inc is None:
        roots = [r for r in job.incidents.values() if r.generation == gen and r.root]
        inc = min(roots, key=lambda r: abs(r.fault_time - now), default=None)
    if inc is not None:
        join(inc, ev, out, "late evidence from an old generation")
    else:
        out.append(Decision("dropped", job.job_id, gen, f"{ev.source} from old generation {gen}", node_id=node_id))


def covers(inc: Incident, node_id: str, rank: int) -> bool:
    """Whether the planner restarts `rank` for this incident (docs/planner.md, restart set)."""
    if inc.action is RepairAction.REPLACE_NODE:
        return node_id in inc.nodes or rank in inc.ranks
    if inc.action is RepairAction.RESTART_PROCESS:
        return rank in inc.ranks if inc.ranks else node_id in inc.nodes
    return False


def restarting(job: JobState, gen: int, node_id: str, rank: int) -> Incident | None:
    """The root incident of generation `gen` that already restarts this rank, if any (ours or a
    peer instance's; a handful per generation)."""
    for inc in job.incidents.values():
        if inc.generation == gen and inc.root and covers(inc, node_id, rank):
            return inc
    return None


def ranks_of(rank: int | None) -> tuple[int, ...]:
    return () if rank is None else (rank,)


def join(inc: Incident, ev: Evidence, out: list[Decision], reason: str) -> None:
    if len(inc.evidence) < 16:
        inc.evidence.append(ev)
    out.append(
        Decision(
            "joined",
            inc.job_id,
            inc.generation,
            reason,
            incident_id=inc.id,
            fault_class=inc.fault_class,
            node_id=ev.node_id,
        )
    )


def attribute(inc: Incident, s: Symptom, out: list[Decision], cfg: Config) -> None:
    inc.symptoms += 1
    if len(inc.evidence) < cfg.max_evidence:
        inc.evidence.append(s.evidence)
    out.append(
        Decision(
            "joined",
            inc.job_id,
            inc.generation,
            f"symptom attributed to {inc.fault_class.value} on {','.join(inc.nodes)}",
            incident_id=inc.id,
            fault_class=inc.fault_class,
            node_id=s.node_id,
        )
    )


def root_for(job: JobState, s: Symptom, cfg: Config) -> Incident | None:
    """The root cause a symptom belongs to: its own node's incident, else the root incident of
    the generation nearest in time that began no more than a window after the symptom."""
    own = job.by_node.get((s.generation, s.node_id))
    if own is not None and own.root:
        return own
    best: Incident | None = None
    for r in job.roots:
        if r.generation == s.generation and r.fault_time - cfg.correlation_window_s <= s.t:
            if best is None or abs(s.t - r.fault_time) < abs(s.t - best.fault_time):
                best = r
    return best


def hold_symptom(job: JobState, s: Symptom, now: float, cfg: Config, out: list[Decision]) -> None:
    root = root_for(job, s, cfg)
    if root is not None:
        attribute_symptom(job, root, s, now, cfg, out)
    else:
        job.pending.append(s)


def attribute_symptom(job: JobState, root: Incident, s: Symptom, now: float, cfg: Config, out: list[Decision]) -> None:
    attribute(root, s, out, cfg)
    restart_dead(job, root, s, now, cfg, out)


def restart_dead(job: JobState, root: Incident, s: Symptom, now: float, cfg: Config, out: list[Decision]) -> None:
    """A rank that exited is restarted whatever it died of. An exit explained by another root
    cause is that root's symptom, yet its process is gone: unless an incident already restarts
    it, it gets a process_crash incident of its own (else the recovery waits for it forever)."""
    if not s.is_exit or s.rank is None or restarting(job, job.generation, s.node_id, s.rank):
        return
    emit_root(
        job,
        FaultClass.PROCESS_CRASH,
        RepairAction.RESTART_PROCESS,
        s.node_id,
        (s.rank,),
        s.t,
        [s.evidence],
        0.6,
        f"rank {s.rank} on {s.node_id} exited after a communication error, a symptom of "
        f"{root.fault_class.value} on {','.join(root.nodes)}; its process is gone: restarted too",
        now,
        cfg,
        out,
    )


def prior_root(job: JobState, s: Symptom, cfg: Config) -> Incident | None:
    """The recovered fault a late communication error belongs to: a survivor's error about the
    peer that died, read by its sidecar after the pause and so stamped with the new generation.
    Taken while the job is still recovering (a paused or recovering rank seen) or within a
    correlation window after; the newest such root."""
    if s.is_exit or not job.prior_roots:
        return None
    if s.t > max(job.advanced_at, job.recovering_seen) + cfg.correlation_window_s:
        return None
    return max(job.prior_roots, key=lambda r: (r.generation, r.fault_time))


def emit(job: JobState, inc: Incident, cfg: Config, out: list[Decision]) -> None:
    job.incidents[inc.id] = inc
    out.append(
        Decision(
            "incident",
            inc.job_id,
            inc.generation,
            inc.reason,
            event=inc.to_event(cfg.producer),
            incident_id=inc.id,
            fault_class=inc.fault_class,
            node_id=",".join(inc.nodes),
        )
    )


def emit_root(
    job: JobState,
    cls: FaultClass,
    action: RepairAction,
    node_id: str | tuple[str, ...],
    ranks: tuple[int, ...],
    fault_time: float,
    evidence: list[Any],
    confidence: float,
    reason: str,
    now: float,
    cfg: Config,
    out: list[Decision],
    symptoms: int = 0,
) -> Incident:
    nodes = (node_id,) if isinstance(node_id, str) else tuple(sorted(node_id))
    gen = job.generation
    iid = incident_id(job.job_id, gen, cls, nodes, ranks)
    known = job.incidents.get(iid)
    if known is not None:  # the same fault derived again (replayed input)
        for ev in evidence:
            join(known, ev, out, "replayed evidence")
        return known
    inc = Incident(
        iid,
        job.job_id,
        gen,
        cls,
        action,
        nodes,
        tuple(sorted(ranks)),
        fault_time,
        min(fault_time, now),
        now,
        list(evidence)[: cfg.max_evidence],
        confidence,
        reason,
        root=True,
    )
    inc.symptoms = symptoms
    # Symptoms already held that this root explains are counted before it goes out.
    absorbed = explained(job, inc, cfg)
    for s in absorbed:
        inc.symptoms += 1
        if len(inc.evidence) < cfg.max_evidence:
            inc.evidence.append(s.evidence)
    for n in nodes:  # the node's first incident keeps collecting its later evidence
        job.by_node.setdefault((gen, n), inc)
    job.roots.append(inc)
    emit(job, inc, cfg, out)
    for s in absorbed:
        restart_dead(job, inc, s, now, cfg, out)
    return inc


def explained(job: JobState, root: Incident, cfg: Config) -> list[Symptom]:
    """Take the held symptoms a new root incident explains off the pending list: those of its
    generation on its own nodes, or that came no earlier than a window before its fault."""
    took: list[Symptom] = []
    keep: list[Symptom] = []
    for s in job.pending:
        if s.generation == root.generation and (
            s.node_id in root.nodes or root.fault_time - cfg.correlation_window_s <= s.t
        ):
            took.append(s)
        else:
            keep.append(s)
    job.pending = keep
    return took
