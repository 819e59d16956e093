"""Classification: one heartbeat, worker exit or log line turned into evidence, and that
evidence into an incident, a held symptom, a degradation or nothing (`observe`). Pure."""

from __future__ import annotations

from typing import Any

from flashrecovery.shared.schemas import (
    Degradation,
    Evidence,
    FaultClass,
    LogEvent,
    NodeHeartbeat,
    NodeRole,
    RankState,
    RepairAction,
    WorkerExit,
)

from .config import Config, Decision
from .correlate import advance, emit_root, evidence_gen, hold_symptom, join, late_evidence, ranks_of, restarting
from .state import INF, DetectorState, JobState, NodeView, RankView, Symptom

FROZEN = frozenset({"T", "t"})


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


def _on_heartbeat(
    state: DetectorState, job: JobState, hb: NodeHeartbeat, now: float, cfg: Config, out: list[Decision]
) -> None:
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
        out.append(Decision("dropped", job.job_id, job.generation, "node heartbeats again", node_id=node.node_id))
    if hb.generation > job.generation:
        advance(job, hb.generation, now, out)
    elif hb.generation < job.generation:
        # Proof of life, but its rank data belongs to an old generation: not used, and what we
        # knew of its ranks no longer holds, so they are not judged for hangs until it catches up.
        state.count("old_generation_heartbeats")
        job.due[node.idx] = INF
        if node.dropped_gen != hb.generation:
            node.dropped_gen = hb.generation
            out.append(
                Decision(
                    "dropped",
                    job.job_id,
                    job.generation,
                    f"heartbeat from old generation {hb.generation}",
                    node_id=node.node_id,
                )
            )
        return
    node.role = hb.role
    _update_ranks(job, node, hb, now, cfg, out)


def _update_ranks(
    job: JobState, node: NodeView, hb: NodeHeartbeat, now: float, cfg: Config, out: list[Decision]
) -> None:
    # The hot path (every rank of every beat): locals only, no enum hashing, no numpy scalars
    # per rank.
    due = INF
    live = False
    gen = job.generation
    median = job.median
    slow_limit = cfg.straggler_factor * median if median > 0 else INF
    running, exited, done = RankState.RUNNING, RankState.EXITED, RankState.DONE
    starting = RankState.STARTING
    paused, recovering, hung = RankState.PAUSED, RankState.RECOVERING, RankState.HUNG
    in_recovery = False
    unanswered: list[RankView] = []
    ranks = node.ranks
    samples = job.samples
    step_max = job.step_max
    for rank, local_rank, _, st, step, t, _, phase, phase_s, since, proc in hb.rank_rows():
        if rank is None:
            # A standby: nothing to watch, and keyed by local rank it would replace the view of
            # a rank sharing its local rank (a stopped rank hidden, its peers blamed).
            continue
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
        # Judged for hangs: running ranks, and starting ranks once inside a declared phase (the
        # agent declares its first step, agent settings first_step_s); before that a starting
        # rank imports and waits for its peers, which the agent's start timeout bounds.
        if st is not running and (st is not starting or phase is None):
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


def _unanswered_pause(
    job: JobState, node: NodeView, rv: RankView, now: float, cfg: Config, out: list[Decision]
) -> None:
    """The sidecar marked a survivor HUNG: it did not confirm a pause within its deadline. It
    cannot take part in the rebuild, so it is the root cause of a hang of its own, restarted by
    the plan that supersedes the one waiting for it (its kill list SIGKILLs it by PID)."""
    if rv.rank is None:
        return
    gen = job.generation
    ev = Evidence(
        source="node_heartbeat",
        node_id=node.node_id,
        rank=rv.rank,
        detail=f"rank {rv.rank} did not answer the pause of generation {gen} within the "
        f"sidecar's deadline (last step {rv.step})",
        observed_at=now,
    )
    cover = restarting(job, gen, node.node_id, rv.rank)
    if cover is not None:
        join(cover, ev, out, "unanswered pause of a rank already being restarted")
        return
    emit_root(
        job,
        FaultClass.HANG,
        RepairAction.RESTART_PROCESS,
        node.node_id,
        (rv.rank,),
        now,
        [ev],
        1.0,
        f"rank {rv.rank} on {node.node_id} did not answer the pause of generation {gen} in time: hung, restarted",
        now,
        cfg,
        out,
    )


def _degradation(
    job: JobState,
    node: NodeView,
    rank: int,
    t: float,
    median: float,
    count: int,
    now: float,
    cfg: Config,
    out: list[Decision],
) -> None:
    reason = f"rank {rank} step time {t:.3f}s > {cfg.straggler_factor:g} x median {median:.3f}s for {count} beats"
    deg = Degradation(
        job_id=job.job_id,
        generation=job.generation,
        emitted_at=now,
        producer=cfg.producer,
        node_id=node.node_id,
        rank=rank,
        step_time_s=t,
        median_step_time_s=median,
        consecutive=count,
        reason=reason,
    )
    out.append(
        Decision(
            "degradation",
            job.job_id,
            job.generation,
            reason,
            event=deg,
            fault_class=FaultClass.STRAGGLER,
            node_id=node.node_id,
        )
    )


def _on_exit(job: JobState, ev: WorkerExit, now: float, cfg: Config, out: list[Decision]) -> None:
    node = job.node(ev.node_id)
    for rv in node.ranks.values():
        if rv.rank == ev.rank and ev.rank is not None:
            rv.state = RankState.EXITED
            rv.stall_start = INF
    if ev.expected:
        return
    if ev.rank is None:
        # A standby holds no rank and no state: its sidecar starts another. An incident would
        # name no rank, and the planner restarts every rank of a node when none is named.
        return
    how = f"signal {ev.signal}" if ev.signal is not None else f"exit code {ev.exit_code}"
    evidence = Evidence(
        source="worker_exit",
        node_id=ev.node_id,
        rank=ev.rank,
        detail=f"rank {ev.rank} pid {ev.pid} {how} at step {ev.step}",
        observed_at=now,
    )
    gen = ev.generation
    if not evidence_gen(job, gen, now, out):
        late_evidence(job, gen, ev.node_id, ev.rank, evidence, now, cfg, out, dead=True)
        return
    existing = job.by_node.get((gen, ev.node_id))
    if existing is not None:
        cover = existing if ev.rank is None else restarting(job, gen, ev.node_id, ev.rank)
        if cover is not None:
            join(cover, evidence, out, "another exit on a node already reported")
            return
        # A second rank of a reported node died and that incident does not restart it: it gets
        # an incident of its own (the planner plans the union, superseding the plan under way).
    key = (ev.node_id, ev.rank)
    header = job.headers.pop(key, None)
    if header is not None:
        emit_root(
            job,
            FaultClass.SOFTWARE,
            RepairAction.RESTART_PROCESS,
            ev.node_id,
            ranks_of(ev.rank),
            header[0],
            [header[1], evidence],
            0.9,
            f"rank {ev.rank} exited ({how}) after a Python traceback",
            now,
            cfg,
            out,
        )
        return
    comm_t = job.comm_recent.get(key)
    if comm_t is not None and now - comm_t <= cfg.correlation_window_s:
        hold_symptom(job, Symptom(now, ev.node_id, ev.rank, gen, evidence, is_exit=True), now, cfg, out)
        return
    emit_root(
        job,
        FaultClass.PROCESS_CRASH,
        RepairAction.RESTART_PROCESS,
        ev.node_id,
        ranks_of(ev.rank),
        now,
        [evidence],
        1.0,
        f"rank {ev.rank} on {ev.node_id} died ({how})",
        now,
        cfg,
        out,
    )


def _on_log(job: JobState, ev: LogEvent, sig: Any, now: float, cfg: Config, out: list[Decision]) -> None:
    evidence = Evidence(source=f"log:{sig.id}", node_id=ev.node_id, rank=ev.rank, detail=ev.line[:300], observed_at=now)
    gen = ev.generation
    if not evidence_gen(job, gen, now, out):
        late_evidence(job, gen, ev.node_id, ev.rank, evidence, now, cfg, out)
        return
    key = (ev.node_id, ev.rank)
    if sig.header:
        if (gen, ev.node_id) in job.by_node:
            join(job.by_node[(gen, ev.node_id)], evidence, out, "traceback on a node already reported")
        else:
            job.headers.setdefault(key, (now, evidence, gen))
        return
    header = job.headers.pop(key, None)
    if sig.fault_class is FaultClass.COMMUNICATION:
        job.comm_recent[key] = now
        hold_symptom(job, Symptom(now, ev.node_id, ev.rank, gen, evidence), now, cfg, out)
        return
    existing = job.by_node.get((gen, ev.node_id))
    if existing is not None:
        join(existing, evidence, out, f"{sig.fault_class.value} evidence on a node already reported")
        return
    first = header[0] if header is not None else now
    evid = [header[1], evidence] if header is not None else [evidence]
    emit_root(
        job,
        sig.fault_class,
        sig.action,
        ev.node_id,
        ranks_of(ev.rank),
        first,
        evid,
        1.0,
        f"rank {ev.rank} on {ev.node_id}: signature {sig.id}",
        now,
        cfg,
        out,
    )
