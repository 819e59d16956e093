"""The detector's decisions: pure functions of (state, event or clock, config). No I/O, no wall
clock: `now` is the detector's receive clock, passed in by the shell. Sender timestamps are never
compared with it; the sidecars measure `since_progress_s` on their own monotonic clocks.

observe(state, event, now, cfg) -> (state, decisions)   a heartbeat, worker exit or log line
observe_incident(state, incident, now, cfg)             a peer instance's incident: a known root
expect_nodes(state, job_id, nodes, now, cfg)            seed nodes handed over in a rebalance
tick(state, now, cfg) -> (state, decisions)             node lost, hang, expiry of held evidence

Root cause before symptoms: a crash, node loss, hang or hardware/OOM/software error is a root
cause and becomes an incident at once (one per node and generation; later evidence from that
node joins it). Communication errors are symptoms: they are held for the correlation window and
attributed to a root cause seen before or after them; only if none turns up does one incident of
class communication go out, with low confidence and action none. A "Traceback" line is held
until its exception line (or the exit, or a short settle time) says what it was, and an exit
that follows a communication error of the same rank is held like a symptom.

Several instances split the nodes between them; each also reads the incidents the others publish
(observe_incident), so a root cause seen by one explains the symptoms held by another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from flashrecovery.shared.schemas import (Degradation, Evidence, FaultClass, LogEvent,
                                          NodeHeartbeat, NodeRole, RankState, RepairAction,
                                          WorkerExit)
from flashrecovery.shared.settings import DetectorSettings

from .signatures import Catalog, load_catalog
from .state import INF, DetectorState, Incident, JobState, NodeView, RankView, Symptom

PRIOR_GENERATIONS = 2  # generations back whose root incidents still explain late symptoms
LIVE_STATES = frozenset({RankState.STARTING, RankState.RUNNING, RankState.PAUSED,
                         RankState.RECOVERING, RankState.STANDBY})
ACTION = {
    FaultClass.PROCESS_CRASH: RepairAction.RESTART_PROCESS,
    FaultClass.NODE_LOST: RepairAction.REPLACE_NODE,
    FaultClass.HANG: RepairAction.RESTART_PROCESS,
    FaultClass.HARDWARE: RepairAction.REPLACE_NODE,
    FaultClass.OUT_OF_MEMORY: RepairAction.RESTART_PROCESS,
    FaultClass.SOFTWARE: RepairAction.RESTART_PROCESS,
    FaultClass.COMMUNICATION: RepairAction.NONE,
}


@dataclass(frozen=True)
class Config:
    heartbeat_interval_s: float = 1.0  # used when a heartbeat does not declare its own
    heartbeat_misses: int = 3
    hang_floor_s: float = 5.0
    hang_k: float = 10.0
    correlation_window_s: float = 3.0
    straggler_factor: float = 2.0
    straggler_consecutive: int = 5
    catalog: Catalog | None = None
    header_settle_s: float = 0.5  # a Traceback with no exception line after this is software
    quiet_factor: float = 1.5  # a node silent for this many intervals is a suspect / not "heartbeating"
    max_evidence: int = 16  # evidence items carried by one incident
    producer: str = "detector"
    # Set by the shell while other instances own part of the job's partitions: a hang with no
    # OS-stopped process among its ranks waits this long for a peer's incident (one that names
    # the stopped process elsewhere) before it is reported here. 0: one instance sees it all.
    peer_grace_s: float = 0.0

    @classmethod
    def from_settings(cls, s: DetectorSettings, producer: str = "detector") -> Config:
        return cls(heartbeat_interval_s=s.heartbeat_interval_s, heartbeat_misses=s.heartbeat_misses,
                   hang_floor_s=s.hang_floor_s, hang_k=s.hang_k,
                   correlation_window_s=s.correlation_window_s,
                   straggler_factor=s.straggler_factor,
                   straggler_consecutive=s.straggler_consecutive,
                   catalog=load_catalog(s.signatures_path), producer=producer)

    @property
    def long_phase_default_s(self) -> float:
        """Extension for a long phase declared without an expected duration."""
        return self.hang_k * self.hang_floor_s


@dataclass(frozen=True)
class Decision:
    """What the detector decided and why. kind: incident | degradation (event set: publish it),
    joined (evidence added to an incident already out), noted (a peer instance's incident is now
    a known root cause here) or dropped (input ignored)."""
    kind: str
    job_id: str
    generation: int
    reason: str
    event: Any = None
    incident_id: str | None = None
    fault_class: FaultClass | None = None
    node_id: str | None = None


def incident_id(job_id: str, generation: int, fault_class: FaultClass, nodes: tuple[str, ...],
                ranks: tuple[int, ...]) -> str:
    """Deterministic: a replay or another detector instance derives the same id."""
    text = "|".join((job_id, str(generation), fault_class.value, ",".join(sorted(nodes)),
                     ",".join(str(r) for r in sorted(ranks))))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------ trust

@dataclass(frozen=True)
class Topology:
    """What the registry says a job is, as far as telemetry may claim it: the detector checks
    every heartbeat, exit and log line against it before the event changes any state (admit)."""
    job_id: str
    generation: int
    world_size: int  # ranks are 0 .. world_size - 1
    nodes: frozenset[str]


def admit(event: Any, topo: Topology | None) -> str | None:
    """Why a worker event must not be trusted, or None. topo None: no registry view of the job
    (no registry, or the job not registered yet): nothing to check against. A forged heartbeat
    with generation 10^6 once made the detector report incidents for nodes that do not exist
    and then take every real event for an old generation, so the next real crash went unseen:
    an unknown node or rank, or a generation ahead of the registry's, is refused here."""
    if topo is None:
        return None
    if event.job_id != topo.job_id:
        return f"job {event.job_id[:80]!r} is not this detector's job"
    node = getattr(event, "node_id", None)
    if node not in topo.nodes:
        return f"node {str(node)[:80]!r} is not in the job's topology"
    if event.generation > topo.generation:
        return f"generation {event.generation} is ahead of the registry's {topo.generation}"
    world = topo.world_size
    if event.kind == "node_heartbeat":
        for row in event.rank_rows():
            rank, gen = row[0], row[6]
            if rank is not None and not 0 <= rank < world:
                return f"rank {rank} is not in the job's topology (world size {world})"
            if gen > topo.generation:
                return f"rank {rank}: generation {gen} is ahead of the registry's {topo.generation}"
        return None
    rank = getattr(event, "rank", None)
    if rank is not None and not 0 <= rank < world:
        return f"rank {rank} is not in the job's topology (world size {world})"
    return None


# ------------------------------------------------------------------------------------ observe

def observe(state: DetectorState, event: Any, now: float, cfg: Config) -> tuple[DetectorState, list[Decision]]:
    out: list[Decision] = []
    kind = getattr(event, "kind", None)
    if kind == "node_heartbeat":
        _on_heartbeat(state, state.job(event.job_id), event, now, cfg, out)
    elif kind == "worker_exit":
        if state.first_time(event.event_id):
            _on_exit(state.job(event.job_id), event, now, cfg, out)
        else:
            state.count("duplicate_events")
    elif kind == "log_event":
        sig = cfg.catalog.match(event.line) if cfg.catalog is not None else None
        if sig is not None:
            if state.first_time(event.event_id):
                _on_log(state.job(event.job_id), event, sig, now, cfg, out)
            else:
                state.count("duplicate_events")
    else:
        state.count("ignored_kinds")
    return state, out


def _on_heartbeat(state: DetectorState, job: JobState, hb: NodeHeartbeat, now: float, cfg: Config,
                  out: list[Decision]) -> None:
    node = job.node(hb.node_id)
    if hb.seq <= node.seq:
        # Redelivered or reordered. A much lower seq after a silence is a restarted sidecar whose
        # counter started over: take it.
        if not (hb.seq < node.seq and now - node.last_seen > 2 * node.interval):
            state.count("stale_heartbeats")
            return
    node.seq = hb.seq
    node.last_seen = now
    interval = hb.interval_s if hb.interval_s > 0 else cfg.heartbeat_interval_s
    node.interval = interval
    i = node.idx
    job.last_seen[i] = now
    job.interval[i] = interval
    job.lost_after[i] = interval * cfg.heartbeat_misses
    if node.lost:
        node.lost = False
        out.append(Decision("dropped", job.job_id, job.generation, "node heartbeats again",
                            node_id=node.node_id))
    if hb.generation > job.generation:
        _advance(job, hb.generation, now, out)
    elif hb.generation < job.generation:
        # Proof of life, but its rank data belongs to an old generation: not used, and what we
        # knew of its ranks no longer holds, so they are not judged for hangs until it catches up.
        state.count("old_generation_heartbeats")
        job.due[node.idx] = INF
        if node.dropped_gen != hb.generation:
            node.dropped_gen = hb.generation
            out.append(Decision("dropped", job.job_id, job.generation,
                                f"heartbeat from old generation {hb.generation}", node_id=node.node_id))
        return
    node.role = hb.role
    _update_ranks(job, node, hb, now, cfg, out)


def _update_ranks(job: JobState, node: NodeView, hb: NodeHeartbeat, now: float, cfg: Config,
                  out: list[Decision]) -> None:
    # The hot path (every rank of every beat): locals only, no enum hashing, no numpy scalars
    # per rank.
    due = INF
    live = False
    gen = job.generation
    median = job.median
    slow_limit = cfg.straggler_factor * median if median > 0 else INF
    running, exited, done = RankState.RUNNING, RankState.EXITED, RankState.DONE
    paused, recovering, hung = RankState.PAUSED, RankState.RECOVERING, RankState.HUNG
    in_recovery = False
    unanswered: list[RankView] = []
    ranks = node.ranks
    samples = job.samples
    step_max = job.step_max
    for rank, local_rank, _, st, step, t, _, phase, phase_s, since, proc in hb.rank_rows():
        rv = ranks.get(local_rank)
        if rv is None:
            rv = ranks[local_rank] = RankView(rank)
        key = (st, phase, gen, rank)
        if key != rv.key:  # a new state or phase is progress: the stall clock restarts
            rv.key = key
            rv.rank = rank
            rv.clear_since = now
            rv.hung = False
            rv.slow = 0
            rv.degraded = False
            if st is hung:
                unanswered.append(rv)
        rv.state = st
        rv.frozen = proc in FROZEN
        if st is not exited and st is not done:
            live = True
        if st is not running:
            rv.stall_start = INF
            rv.step = step
            if st is paused or st is recovering:
                in_recovery = True
            continue
        stall = now - since
        if stall < rv.clear_since:
            stall = rv.clear_since
        rv.stall_start = stall
        if phase is None:
            extra = 0.0
        else:
            extra = phase_s
            if extra is None:
                extra = cfg.long_phase_default_s
        rv.extra = extra
        if step != rv.step:
            rv.hung = False
            rv.step = step
            if t is not None and t > 0:
                known = step_max.get(step)
                if known is None or t > known:
                    job.note_step(step, t)
        if not rv.hung and stall + extra < due:
            due = stall + extra
        if t is None or t <= 0:
            continue
        samples.append(t)
        if t > slow_limit and phase is None:
            rv.slow += 1
            if rv.slow >= cfg.straggler_consecutive and not rv.degraded and rank is not None:
                rv.degraded = True
                _degradation(job, node, rank, t, median, rv.slow, now, cfg, out)
        elif rv.slow:
            rv.slow = 0
            rv.degraded = False
    if in_recovery:
        job.recovering_seen = now
    for rv in unanswered:
        _unanswered_pause(job, node, rv, now, cfg, out)
    i = node.idx
    job.due[i] = due
    job.watch[i] = live and node.role is NodeRole.ACTIVE


def _unanswered_pause(job: JobState, node: NodeView, rv: RankView, now: float, cfg: Config,
                      out: list[Decision]) -> None:
    """The sidecar marked a survivor HUNG: it did not confirm a pause within its deadline. It
    cannot take part in the rebuild, so it is the root cause of a hang of its own, restarted by
    the plan that supersedes the one waiting for it (its kill list SIGKILLs it by PID)."""
    if rv.rank is None:
        return
    gen = job.generation
    ev = Evidence(source="node_heartbeat", node_id=node.node_id, rank=rv.rank,
                  detail=f"rank {rv.rank} did not answer the pause of generation {gen} within the "
                         f"sidecar's deadline (last step {rv.step})", observed_at=now)
    cover = _restarting(job, gen, node.node_id, rv.rank)
    if cover is not None:
        _join(cover, ev, out, "unanswered pause of a rank already being restarted")
        return
    _emit_root(job, FaultClass.HANG, RepairAction.RESTART_PROCESS, node.node_id, (rv.rank,), now,
               [ev], 1.0, f"rank {rv.rank} on {node.node_id} did not answer the pause of generation "
               f"{gen} in time: hung, restarted", now, cfg, out)


def _degradation(job: JobState, node: NodeView, rank: int, t: float, median: float, count: int,
                 now: float, cfg: Config, out: list[Decision]) -> None:
    reason = (f"rank {rank} step time {t:.3f}s > {cfg.straggler_factor:g} x median "
              f"{median:.3f}s for {count} beats")
    deg = Degradation(job_id=job.job_id, generation=job.generation, emitted_at=now,
                      producer=cfg.producer, node_id=node.node_id, rank=rank, step_time_s=t,
                      median_step_time_s=median, consecutive=count, reason=reason)
    out.append(Decision("degradation", job.job_id, job.generation, reason, event=deg,
                        fault_class=FaultClass.STRAGGLER, node_id=node.node_id))


def _advance(job: JobState, generation: int, now: float, out: list[Decision]) -> None:
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
    job.prior_roots = [r for r in job.prior_roots + job.roots
                       if generation - PRIOR_GENERATIONS <= r.generation < generation]
    job.advanced_at = now
    job.roots = [r for r in job.roots if r.generation >= generation]
    if job.comm_open is not None and job.comm_open.generation < generation:
        job.comm_open = None
    for key in [k for k in job.by_node if k[0] < generation - 1]:
        del job.by_node[key]
    for iid in [k for k, v in job.incidents.items() if v.generation < generation - 1]:
        del job.incidents[iid]
    out.append(Decision("dropped", job.job_id, generation,
                        f"generation {old} -> {generation}; {dropped} held symptoms dropped"))


def _evidence_gen(job: JobState, gen: int, now: float, out: list[Decision]) -> bool:
    """True when evidence of generation `gen` is current; handles newer and older ones."""
    if gen > job.generation:
        _advance(job, gen, now, out)
    return gen == job.generation


def _late(job: JobState, gen: int, node_id: str, rank: int | None, ev: Evidence, now: float,
          cfg: Config, out: list[Decision], *, dead: bool = False) -> None:
    """Evidence of a generation older than the job's: it joins that generation's incident of its
    node, else the root incident of that generation nearest in time. A rank that died then and
    that no incident restarts is dead now too: it becomes an incident of the current generation
    (else the recovery under way waits for it forever)."""
    if dead and rank is not None:
        cover = _restarting(job, gen, node_id, rank) or _restarting(job, job.generation, node_id, rank)
        if cover is None:
            _emit_root(job, FaultClass.PROCESS_CRASH, RepairAction.RESTART_PROCESS, node_id, (rank,),
                       now, [ev], 1.0, f"rank {rank} on {node_id} died in generation {gen} (reported "
                       f"after the job moved to {job.generation}); no incident restarts it", now, cfg, out)
        else:
            _join(cover, ev, out, "late exit of a rank already being restarted")
        return
    inc = job.by_node.get((gen, node_id))
    if inc is None:
        roots = [r for r in job.incidents.values() if r.generation == gen and r.root]
        inc = min(roots, key=lambda r: abs(r.fault_time - now), default=None)
    if inc is not None:
        _join(inc, ev, out, "late evidence from an old generation")
    else:
        out.append(Decision("dropped", job.job_id, gen, f"{ev.source} from old generation {gen}",
                            node_id=node_id))


def _covers(inc: Incident, node_id: str, rank: int) -> bool:
    """Whether the planner restarts `rank` for this incident (docs/planner.md, restart set)."""
    if inc.action is RepairAction.REPLACE_NODE:
        return node_id in inc.nodes or rank in inc.ranks
    if inc.action is RepairAction.RESTART_PROCESS:
        return rank in inc.ranks if inc.ranks else node_id in inc.nodes
    return False


def _restarting(job: JobState, gen: int, node_id: str, rank: int) -> Incident | None:
    """The root incident of generation `gen` that already restarts this rank, if any (ours or a
    peer instance's; a handful per generation)."""
    for inc in job.incidents.values():
        if inc.generation == gen and inc.root and _covers(inc, node_id, rank):
            return inc
    return None


def _on_exit(job: JobState, ev: WorkerExit, now: float, cfg: Config, out: list[Decision]) -> None:
    node = job.node(ev.node_id)
    for rv in node.ranks.values():
        if rv.rank == ev.rank and ev.rank is not None:
            rv.state = RankState.EXITED
            rv.stall_start = INF
    if ev.expected:
        return
    how = f"signal {ev.signal}" if ev.signal is not None else f"exit code {ev.exit_code}"
    evidence = Evidence(source="worker_exit", node_id=ev.node_id, rank=ev.rank,
                        detail=f"rank {ev.rank} pid {ev.pid} {how} at step {ev.step}", observed_at=now)
    gen = ev.generation
    if not _evidence_gen(job, gen, now, out):
        _late(job, gen, ev.node_id, ev.rank, evidence, now, cfg, out, dead=True)
        return
    existing = job.by_node.get((gen, ev.node_id))
    if existing is not None:
        cover = existing if ev.rank is None else _restarting(job, gen, ev.node_id, ev.rank)
        if cover is not None:
            _join(cover, evidence, out, "another exit on a node already reported")
            return
        # A second rank of a reported node died and that incident does not restart it: it gets
        # an incident of its own (the planner plans the union, superseding the plan under way).
    key = (ev.node_id, ev.rank)
    header = job.headers.pop(key, None)
    if header is not None:
        _emit_root(job, FaultClass.SOFTWARE, RepairAction.RESTART_PROCESS, ev.node_id,
                   _ranks(ev.rank), header[0], [header[1], evidence], 0.9,
                   f"rank {ev.rank} exited ({how}) after a Python traceback", now, cfg, out)
        return
    comm_t = job.comm_recent.get(key)
    if comm_t is not None and now - comm_t <= cfg.correlation_window_s:
        _symptom(job, Symptom(now, ev.node_id, ev.rank, gen, evidence, is_exit=True), now, cfg, out)
        return
    _emit_root(job, FaultClass.PROCESS_CRASH, RepairAction.RESTART_PROCESS, ev.node_id,
               _ranks(ev.rank), now, [evidence], 1.0, f"rank {ev.rank} on {ev.node_id} died ({how})",
               now, cfg, out)


def _on_log(job: JobState, ev: LogEvent, sig: Any, now: float, cfg: Config, out: list[Decision]) -> None:
    evidence = Evidence(source=f"log:{sig.id}", node_id=ev.node_id, rank=ev.rank,
                        detail=ev.line[:300], observed_at=now)
    gen = ev.generation
    if not _evidence_gen(job, gen, now, out):
        _late(job, gen, ev.node_id, ev.rank, evidence, now, cfg, out)
        return
    key = (ev.node_id, ev.rank)
    if sig.header:
        if (gen, ev.node_id) in job.by_node:
            _join(job.by_node[(gen, ev.node_id)], evidence, out, "traceback on a node already reported")
        else:
            job.headers.setdefault(key, (now, evidence, gen))
        return
    header = job.headers.pop(key, None)
    if sig.fault_class is FaultClass.COMMUNICATION:
        job.comm_recent[key] = now
        _symptom(job, Symptom(now, ev.node_id, ev.rank, gen, evidence), now, cfg, out)
        return
    existing = job.by_node.get((gen, ev.node_id))
    if existing is not None:
        _join(existing, evidence, out, f"{sig.fault_class.value} evidence on a node already reported")
        return
    first = header[0] if header is not None else now
    evid = [header[1], evidence] if header is not None else [evidence]
    _emit_root(job, sig.fault_class, sig.action, ev.node_id, _ranks(ev.rank), first, evid, 1.0,
               f"rank {ev.rank} on {ev.node_id}: signature {sig.id}", now, cfg, out)


def _ranks(rank: int | None) -> tuple[int, ...]:
    return () if rank is None else (rank,)


# ------------------------------------------------------------------------- incidents, symptoms

def _join(inc: Incident, ev: Evidence, out: list[Decision], reason: str) -> None:
    if len(inc.evidence) < 16:
        inc.evidence.append(ev)
    out.append(Decision("joined", inc.job_id, inc.generation, reason, incident_id=inc.id,
                        fault_class=inc.fault_class, node_id=ev.node_id))


def _attribute(inc: Incident, s: Symptom, out: list[Decision], cfg: Config) -> None:
    inc.symptoms += 1
    if len(inc.evidence) < cfg.max_evidence:
        inc.evidence.append(s.evidence)
    out.append(Decision("joined", inc.job_id, inc.generation,
                        f"symptom attributed to {inc.fault_class.value} on {','.join(inc.nodes)}",
                        incident_id=inc.id, fault_class=inc.fault_class, node_id=s.node_id))


def _root_for(job: JobState, s: Symptom, cfg: Config) -> Incident | None:
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


def _symptom(job: JobState, s: Symptom, now: float, cfg: Config, out: list[Decision]) -> None:
    root = _root_for(job, s, cfg)
    if root is not None:
        _attribute_symptom(job, root, s, now, cfg, out)
    else:
        job.pending.append(s)


def _attribute_symptom(job: JobState, root: Incident, s: Symptom, now: float, cfg: Config,
                       out: list[Decision]) -> None:
    _attribute(root, s, out, cfg)
    _restart_dead(job, root, s, now, cfg, out)


def _restart_dead(job: JobState, root: Incident, s: Symptom, now: float, cfg: Config,
                  out: list[Decision]) -> None:
    """A rank that exited is restarted whatever it died of. An exit explained by another root
    cause is that root's symptom, yet its process is gone: unless an incident already restarts
    it, it gets a process_crash incident of its own (else the recovery waits for it forever)."""
    if not s.is_exit or s.rank is None or _restarting(job, job.generation, s.node_id, s.rank):
        return
    _emit_root(job, FaultClass.PROCESS_CRASH, RepairAction.RESTART_PROCESS, s.node_id, (s.rank,),
               s.t, [s.evidence], 0.6,
               f"rank {s.rank} on {s.node_id} exited after a communication error, a symptom of "
               f"{root.fault_class.value} on {','.join(root.nodes)}; its process is gone: restarted too",
               now, cfg, out)


def _prior_root(job: JobState, s: Symptom, cfg: Config) -> Incident | None:
    """The recovered fault a late communication error belongs to: a survivor's error about the
    peer that died, read by its sidecar after the pause and so stamped with the new generation.
    Taken while the job is still recovering (a paused or recovering rank seen) or within a
    correlation window after; the newest such root."""
    if s.is_exit or not job.prior_roots:
        return None
    if s.t > max(job.advanced_at, job.recovering_seen) + cfg.correlation_window_s:
        return None
    return max(job.prior_roots, key=lambda r: (r.generation, r.fault_time))


def _emit(job: JobState, inc: Incident, cfg: Config, out: list[Decision]) -> None:
    job.incidents[inc.id] = inc
    out.append(Decision("incident", inc.job_id, inc.generation, inc.reason,
                        event=inc.to_event(cfg.producer), incident_id=inc.id,
                        fault_class=inc.fault_class, node_id=",".join(inc.nodes)))


def _emit_root(job: JobState, cls: FaultClass, action: RepairAction, node_id: str | tuple[str, ...],
               ranks: tuple[int, ...], fault_time: float, evidence: list[Any], confidence: float,
               reason: str, now: float, cfg: Config, out: list[Decision],
               symptoms: int = 0) -> Incident:
    nodes = (node_id,) if isinstance(node_id, str) else tuple(sorted(node_id))
    gen = job.generation
    iid = incident_id(job.job_id, gen, cls, nodes, ranks)
    known = job.incidents.get(iid)
    if known is not None:  # the same fault derived again (replayed input)
        for ev in evidence:
            _join(known, ev, out, "replayed evidence")
        return known
    inc = Incident(iid, job.job_id, gen, cls, action, nodes, tuple(sorted(ranks)), fault_time,
                   min(fault_time, now), now, list(evidence)[: cfg.max_evidence], confidence,
                   reason, root=True)
    inc.symptoms = symptoms
    # Symptoms already held that this root explains are counted before it goes out.
    absorbed = _explained(job, inc, cfg)
    for s in absorbed:
        inc.symptoms += 1
        if len(inc.evidence) < cfg.max_evidence:
            inc.evidence.append(s.evidence)
    for n in nodes:  # the node's first incident keeps collecting its later evidence
        job.by_node.setdefault((gen, n), inc)
    job.roots.append(inc)
    _emit(job, inc, cfg, out)
    for s in absorbed:
        _restart_dead(job, inc, s, now, cfg, out)
    return inc


def _explained(job: JobState, root: Incident, cfg: Config) -> list[Symptom]:
    """Take the held symptoms a new root incident explains off the pending list: those of its
    generation on its own nodes, or that came no earlier than a window before its fault."""
    took: list[Symptom] = []
    keep: list[Symptom] = []
    for s in job.pending:
        if s.generation == root.generation and (
                s.node_id in root.nodes or root.fault_time - cfg.correlation_window_s <= s.t):
            took.append(s)
        else:
            keep.append(s)
    job.pending = keep
    return took


# ------------------------------------------------------------------------------- peer instances

def observe_incident(state: DetectorState, incident: Any, now: float,
                     cfg: Config) -> tuple[DetectorState, list[Decision]]:
    """An incident published by another detector instance, read back from the incidents topic.

    A root incident becomes a known root cause here, exactly as if this instance had emitted it:
    held symptoms it explains are attributed to it at once (no incident of ours), later symptoms,
    hangs and evidence of its nodes in its generation join it. A peer's unexplained-communication
    incident becomes the one later unexplained errors here join. Never published again.

    Ignored: our own incidents (producer), degradations, incidents of a generation older than
    the job's, and an incident id already known (a redelivery, or one we derived ourselves).

    The fault time is placed on our receive clock: arrival less the time the peer took from the
    fault to its detection (an interval of the peer's clock; the two clocks are never compared)."""
    out: list[Decision] = []
    if getattr(incident, "kind", None) != "fault_incident":
        state.count("ignored_kinds")
        return state, out
    if incident.producer == cfg.producer:
        state.count("own_incidents")
        return state, out
    job = state.job(incident.job_id)
    gen = incident.generation
    iid = incident.incident_id
    if gen < job.generation:
        state.count("old_generation_incidents")
        out.append(Decision("dropped", job.job_id, gen,
                            f"incident from {incident.producer} of old generation {gen}",
                            incident_id=iid, fault_class=incident.fault_class))
        return state, out
    if iid in job.incidents:
        state.count("duplicate_incidents")
        return state, out
    cls = incident.fault_class
    took = max(0.0, incident.detected_at - incident.first_seen_at)
    fault_time = now - took
    nodes = tuple(sorted(incident.root_cause_nodes))
    root = cls is not FaultClass.COMMUNICATION
    inc = Incident(iid, job.job_id, gen, cls, incident.action, nodes,
                   tuple(sorted(incident.root_cause_ranks)), fault_time, fault_time, now,
                   list(incident.evidence)[: cfg.max_evidence], incident.confidence,
                   incident.reason, root=root)
    inc.symptoms = incident.symptoms_attributed
    inc.origin = incident.producer
    job.incidents[iid] = inc
    state.count("peer_incidents")
    absorbed = 0
    if root:
        for n in nodes:
            job.by_node.setdefault((gen, n), inc)
        job.roots.append(inc)
        for s in _explained(job, inc, cfg):
            _attribute_symptom(job, inc, s, now, cfg, out)
            absorbed += 1
    elif gen == job.generation and job.comm_open is None:
        job.comm_open = inc
    out.append(Decision("noted", job.job_id, gen,
                        f"{cls.value} on {','.join(nodes)} reported by {incident.producer}; "
                        f"{absorbed} held symptoms attributed to it", incident_id=iid,
                        fault_class=cls, node_id=",".join(nodes)))
    return state, out


# ------------------------------------------------------------------------------------ ownership

def release_nodes(state: DetectorState, keep: Callable[[str], bool]) -> int:
    """Forget the nodes this instance no longer owns (their partitions moved to another detector
    in a rebalance), so their silence here is not taken for a lost node. A node that comes back
    is learnt again from its next heartbeat. Returns how many nodes were released."""
    released = 0
    for job in state.jobs.values():
        for node in job.by_idx:
            if node.ranks or node.seq >= 0:
                if keep(node.node_id):
                    continue
                job.watch[node.idx] = False
                job.due[node.idx] = INF
                node.ranks.clear()
                node.seq = -1
                node.lost = False
                released += 1
    return released


def expect_nodes(state: DetectorState, job_id: str,
                 nodes: Iterable[tuple[str, tuple[tuple[int, int], ...]]], now: float,
                 cfg: Config) -> int | None:
    """Nodes of partitions this instance took over in a rebalance, from the registry topology:
    (node id, ((rank, local rank), ...)). A node already heard of here is left alone; one never
    heard of is watched as if it had beaten at `now` (the handover), so a node that died before
    the handover and never beats again is reported lost after the usual misses. Returns how many
    nodes were seeded, or None while the job is not heard here at all (no node beat within
    quiet_factor intervals): a finished or not yet started job has nobody to expect."""
    job = state.jobs.get(job_id)
    n = 0 if job is None else len(job.by_idx)
    if job is None or n == 0 or not bool(
            (now - job.last_seen[:n] <= cfg.quiet_factor * job.interval[:n]).any()):
        return None
    seeded = 0
    interval = cfg.heartbeat_interval_s
    for node_id, ranks in nodes:
        if not ranks:
            continue
        known = job.nodes.get(node_id)
        if known is not None and (known.seq >= 0 or known.ranks):
            continue
        node = job.node(node_id)
        node.ranks = {lr: RankView(rank) for rank, lr in ranks}
        node.role = NodeRole.ACTIVE
        node.lost = False
        node.last_seen = now
        node.interval = interval
        i = node.idx
        job.last_seen[i] = now
        job.interval[i] = interval
        job.lost_after[i] = interval * cfg.heartbeat_misses
        job.due[i] = INF
        job.watch[i] = True
        seeded += 1
    return seeded


# ------------------------------------------------------------------------------------ tick

def tick(state: DetectorState, now: float, cfg: Config) -> tuple[DetectorState, list[Decision]]:
    out: list[Decision] = []
    for job in state.jobs.values():
        _refresh_stats(job, cfg)
        n = len(job.by_idx)
        if n == 0:
            continue
        _check_lost(job, n, now, cfg, out)
        _check_hang(job, n, now, cfg, out)
        _settle_headers(job, now, cfg, out)
        if job.pending:
            _expire_symptoms(job, n, now, cfg, out)
        if len(job.comm_recent) > 4096:
            job.comm_recent = {k: t for k, t in job.comm_recent.items()
                               if now - t <= cfg.correlation_window_s}
    return state, out


def _refresh_stats(job: JobState, cfg: Config) -> None:
    if job.samples:
        job.median = float(np.median(np.fromiter(job.samples, float, len(job.samples))))
    p99 = float(np.percentile(np.fromiter(job.step_max.values(), float), 99)) if job.step_max else 0.0
    job.base_threshold = max(cfg.hang_k * p99, cfg.hang_floor_s)


def _check_lost(job: JobState, n: int, now: float, cfg: Config, out: list[Decision]) -> None:
    overdue = job.watch[:n] & (now - job.last_seen[:n] > job.lost_after[:n])
    for i in np.flatnonzero(overdue):
        node = job.by_idx[i]
        job.watch[i] = False
        job.due[i] = INF
        node.lost = True
        silent = now - node.last_seen
        heard = f"seq {node.seq}" if node.seq >= 0 else "expected from the registry, never heard here"
        ev = Evidence(source="node_heartbeat", node_id=node.node_id,
                      detail=f"no heartbeat for {silent:.2f}s (interval {node.interval:g}s, {heard})",
                      observed_at=now)
        existing = job.by_node.get((job.generation, node.node_id))
        if existing is not None:
            _join(existing, ev, out, "heartbeats stopped on a node already reported")
            continue
        ranks = tuple(sorted(rv.rank for rv in node.ranks.values() if rv.rank is not None))
        _emit_root(job, FaultClass.NODE_LOST, RepairAction.REPLACE_NODE, node.node_id, ranks,
                   node.last_seen, [ev], 1.0,
                   f"{node.node_id} missed {cfg.heartbeat_misses} heartbeats ({silent:.2f}s silent)",
                   now, cfg, out)


FROZEN = frozenset({"T", "t"})


def _check_hang(job: JobState, n: int, now: float, cfg: Config, out: list[Decision]) -> None:
    base = job.base_threshold
    beating = now - job.last_seen[:n] <= cfg.quiet_factor * job.interval[:n]
    candidates = np.flatnonzero(job.watch[:n] & beating & (job.due[:n] + base < now))
    if len(candidates) == 0:
        job.hang_held = None
        return
    hung: list[tuple[NodeView, RankView]] = []
    for i in candidates:
        node = job.by_idx[i]
        for rv in node.ranks.values():
            if (rv.state is RankState.RUNNING and not rv.hung
                    and rv.stall_start + rv.extra + base < now):
                rv.hung = True
                hung.append((node, rv))
        job.due[i] = INF  # re-armed by the node's next heartbeat (hung ranks stay out)
    gen = job.generation
    margin = cfg.correlation_window_s + (base / cfg.hang_k)
    fresh: list[tuple[NodeView, RankView]] = []
    for node, rv in hung:
        ev = Evidence(source="node_heartbeat", node_id=node.node_id, rank=rv.rank,
                      detail=f"rank {rv.rank} at step {rv.step} for {now - rv.stall_start:.2f}s "
                             f"(threshold {base + rv.extra:.2f}s)", observed_at=now)
        own = job.by_node.get((gen, node.node_id))
        if own is not None:
            _join(own, ev, out, "hang on a node already reported")
            continue
        root = next((r for r in job.roots if rv.stall_start >= r.fault_time - margin), None)
        if root is not None:  # stalled because of a fault already reported elsewhere
            _attribute(root, Symptom(rv.stall_start, node.node_id, rv.rank, gen, ev), out, cfg)
            continue
        fresh.append((node, rv))
    if not fresh:
        job.hang_held = None
        return
    if cfg.peer_grace_s > 0 and not any(rv.frozen for _, rv in fresh):
        # Part of the job is watched by other instances: the process everyone waits on may be
        # theirs. Judged again every tick until a peer's incident explains these ranks or the
        # grace is over.
        if job.hang_held is None:
            job.hang_held = now
        if now - job.hang_held < cfg.peer_grace_s:
            for node, rv in fresh:
                rv.hung = False
                i = node.idx
                job.due[i] = min(job.due[i], rv.stall_start + rv.extra)
            return
    job.hang_held = None
    # Ranks that stall together are one hang. A process the OS reports stopped is where it is
    # (its peers are merely blocked in a collective with it); otherwise the ranks behind the
    # others are; when all stand at the same step, the root cannot be told apart and all are named.
    frozen = [(nd, rv) for nd, rv in fresh if rv.frozen]
    low = min(rv.step for _, rv in fresh)
    root_pairs = frozen or [(nd, rv) for nd, rv in fresh if rv.step == low]
    nodes = tuple(sorted({nd.node_id for nd, _ in root_pairs}))
    ranks = tuple(sorted(rv.rank for _, rv in root_pairs if rv.rank is not None))
    stall = min(rv.stall_start for _, rv in root_pairs)
    evidence = [Evidence(source="node_heartbeat", node_id=nd.node_id, rank=rv.rank,
                         detail=f"rank {rv.rank} step {rv.step} stalled {now - rv.stall_start:.2f}s "
                                f"(threshold {base + rv.extra:.2f}s)", observed_at=now)
                for nd, rv in root_pairs[: cfg.max_evidence]]
    others = len(fresh) - len(root_pairs)
    reason = (f"ranks {list(ranks)} on {list(nodes)} made no progress for "
              f"{now - stall:.2f}s > threshold {base:.2f}s (max({cfg.hang_k:g} x p99 step, "
              f"{cfg.hang_floor_s:g}s))")
    if others:
        reason += f"; {others} ranks at later steps stalled behind them"
    confidence = 1.0 if len(nodes) == 1 or frozen else 0.5
    _emit_root(job, FaultClass.HANG, RepairAction.RESTART_PROCESS, nodes, ranks, stall, evidence,
               confidence, reason, now, cfg, out, symptoms=others)


def _settle_headers(job: JobState, now: float, cfg: Config, out: list[Decision]) -> None:
    ready = [k for k, v in job.headers.items() if now - v[0] >= cfg.header_settle_s]
    for key in ready:
        t, ev, gen = job.headers.pop(key)
        node_id, rank = key
        if gen != job.generation:
            continue
        existing = job.by_node.get((gen, node_id))
        if existing is not None:
            _join(existing, ev, out, "traceback on a node already reported")
            continue
        _emit_root(job, FaultClass.SOFTWARE, RepairAction.RESTART_PROCESS, node_id, _ranks(rank), t,
                   [ev], 0.8, f"rank {rank} on {node_id} printed a Python traceback", now, cfg, out)


def _expire_symptoms(job: JobState, n: int, now: float, cfg: Config, out: list[Decision]) -> None:
    window = cfg.correlation_window_s
    # A node that has gone quiet may be about to be declared lost: wait for it (bounded).
    quiet = job.watch[:n] & (now - job.last_seen[:n] > cfg.quiet_factor * job.interval[:n])
    waiting_on_suspects = bool(quiet.any()) or bool(job.headers)
    patience = window + cfg.heartbeat_interval_s * cfg.heartbeat_misses + 1.0
    keep: list[Symptom] = []
    expired: list[Symptom] = []
    for s in job.pending:
        if s.generation != job.generation:
            if s.is_exit:  # held in a generation the job has left: restart it unless covered
                _late(job, s.generation, s.node_id, s.rank, s.evidence, now, cfg, out, dead=True)
            continue
        root = _root_for(job, s, cfg)
        if root is not None:
            _attribute_symptom(job, root, s, now, cfg, out)
        elif now - s.t >= window and (not waiting_on_suspects or now - s.t >= patience):
            expired.append(s)
        else:
            keep.append(s)
    job.pending = keep
    if not expired:
        return
    exits = [s for s in expired if s.is_exit]
    logs = [s for s in expired if not s.is_exit]
    for node_id in sorted({s.node_id for s in exits}):
        mine = [s for s in exits if s.node_id == node_id]
        existing = job.by_node.get((job.generation, node_id))
        if existing is not None:
            for s in mine:
                _join(existing, s.evidence, out, "exit on a node already reported")
                _restart_dead(job, existing, s, now, cfg, out)
            continue
        ranks = tuple(sorted({s.rank for s in mine if s.rank is not None}))
        _emit_root(job, FaultClass.PROCESS_CRASH, RepairAction.RESTART_PROCESS, node_id, ranks,
                   min(s.t for s in mine), [s.evidence for s in mine], 0.6,
                   f"ranks {list(ranks)} on {node_id} exited after a communication error; "
                   f"no other root cause within {window:g}s", now, cfg, out)
    late = [(s, _prior_root(job, s, cfg)) for s in logs]
    for s, prior in late:
        if prior is not None:
            _attribute(prior, s, out, cfg)
    logs = [s for s, prior in late if prior is None]
    if not logs:
        return
    if job.comm_open is not None and job.comm_open.generation == job.generation:
        for s in logs:
            _attribute(job.comm_open, s, out, cfg)
        return
    nodes = tuple(sorted({s.node_id for s in logs}))
    ranks = tuple(sorted({s.rank for s in logs if s.rank is not None}))
    gen = job.generation
    iid = incident_id(job.job_id, gen, FaultClass.COMMUNICATION, nodes, ranks)
    known = job.incidents.get(iid)
    if known is not None:  # a peer instance reported the same errors already
        for s in logs:
            _attribute(known, s, out, cfg)
        return
    first = min(s.t for s in logs)
    inc = Incident(iid, job.job_id, gen, FaultClass.COMMUNICATION, RepairAction.NONE, nodes, ranks,
                   first, first, now, [s.evidence for s in logs[: cfg.max_evidence]], 0.2,
                   f"{len(logs)} communication errors on {len(nodes)} nodes and no crash, node "
                   f"loss, hang or hardware fault within {window:g}s: reported for an operator, "
                   f"no repair", root=False)
    inc.symptoms = len(logs) - 1
    job.comm_open = inc
    _emit(job, inc, cfg, out)
