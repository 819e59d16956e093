"""Timers: what the passing of time decides (`tick`): a node lost, a hang, a Traceback with no
exception line, held symptoms whose correlation window is over. Pure: `now` is passed in."""

from __future__ import annotations

import numpy as np

from flashrecovery.shared.schemas import Evidence, FaultClass, RepairAction

from .config import Config, Decision, incident_id
from .correlate import (
    attribute,
    attribute_symptom,
    emit,
    emit_root,
    join,
    late_evidence,
    prior_root,
    ranks_of,
    restart_dead,
    root_for,
)
from .state import INF, DetectorState, Incident, JobState, NodeView, RankView, Symptom


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
            job.comm_recent = {k: t for k, t in job.comm_recent.items() if now - t <= cfg.correlation_window_s}
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
        ev = Evidence(
            source="node_heartbeat",
            node_id=node.node_id,
            detail=f"no heartbeat for {silent:.2f}s (interval {node.interval:g}s, {heard})",
            observed_at=now,
        )
        existing = job.by_node.get((job.generation, node.node_id))
        if existing is not None:
            join(existing, ev, out, "heartbeats stopped on a node already reported")
            continue
        ranks = tuple(sorted(rv.rank for rv in node.ranks.values() if rv.rank is not None))
        why = f"{node.node_id} missed {cfg.heartbeat_misses} heartbeats ({silent:.2f}s silent)"
        lost = (FaultClass.NODE_LOST, RepairAction.REPLACE_NODE)
        emit_root(job, *lost, node.node_id, ranks, node.last_seen, [ev], 1.0, why, now, cfg, out)


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
            # Only ranks classify judges have a finite stall clock: running ones, and starting
            # ones inside a declared phase (their first step).
            if not rv.hung and rv.stall_start + rv.extra + base < now:
                rv.hung = True
                hung.append((node, rv))
        job.due[i] = INF  # re-armed by the node's next heartbeat (hung ranks stay out)
    gen = job.generation
    margin = cfg.correlation_window_s + (base / cfg.hang_k)
    fresh: list[tuple[NodeView, RankView]] = []
    for node, rv in hung:
        ev = Evidence(
            source="node_heartbeat",
            node_id=node.node_id,
            rank=rv.rank,
            detail=f"rank {rv.rank} at step {rv.step} for {now - rv.stall_start:.2f}s "
            f"(threshold {base + rv.extra:.2f}s)",
            observed_at=now,
        )
        own = job.by_node.get((gen, node.node_id))
        if own is not None:
            join(own, ev, out, "hang on a node already reported")
            continue
        root = next((r for r in job.roots if rv.stall_start >= r.fault_time - margin), None)
        if root is not None:  # stalled because of a fault already reported elsewhere
            attribute(root, Symptom(rv.stall_start, node.node_id, rv.rank, gen, ev), out, cfg)
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
                job.due[node.idx] = min(job.due[node.idx], rv.stall_start + rv.extra)
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
    evidence = [
        Evidence(
            source="node_heartbeat",
            node_id=nd.node_id,
            rank=rv.rank,
            detail=f"rank {rv.rank} step {rv.step} stalled {now - rv.stall_start:.2f}s "
            f"(threshold {base + rv.extra:.2f}s)",
            observed_at=now,
        )
        for nd, rv in root_pairs[: cfg.max_evidence]
    ]
    others = len(fresh) - len(root_pairs)
    reason = (
        f"ranks {list(ranks)} on {list(nodes)} made no progress for "
        f"{now - stall:.2f}s > threshold {base:.2f}s (max({cfg.hang_k:g} x p99 step, "
        f"{cfg.hang_floor_s:g}s))"
    )
    phases = sorted({p for _, rv in root_pairs if (p := _phase(rv)) is not None})
    if phases:
        longest = max(rv.extra for _, rv in root_pairs)
        reason += f" + the declared phase {', '.join(phases)} ({longest:g}s)"
    if others:
        reason += f"; {others} ranks at later steps stalled behind them"
    confidence = 1.0 if len(nodes) == 1 or frozen else 0.5
    emit_root(
        job,
        FaultClass.HANG,
        RepairAction.RESTART_PROCESS,
        nodes,
        ranks,
        stall,
        evidence,
        confidence,
        reason,
        now,
        cfg,
        out,
        symptoms=others,
    )


def _phase(rv: RankView) -> str | None:
    """The long phase a rank declared, from its progress key (state, phase, generation, rank)."""
    return rv.key[1]  # type: ignore[return-value]  # set by the beat that started its clock


def _settle_headers(job: JobState, now: float, cfg: Config, out: list[Decision]) -> None:
    ready = [k for k, v in job.headers.items() if now - v[0] >= cfg.header_settle_s]
    for key in ready:
        t, ev, gen = job.headers.pop(key)
        node_id, rank = key
        if gen != job.generation:
            continue
        existing = job.by_node.get((gen, node_id))
        if existing is not None:
            join(existing, ev, out, "traceback on a node already reported")
            continue
        why = f"rank {rank} on {node_id} printed a Python traceback"
        software = (FaultClass.SOFTWARE, RepairAction.RESTART_PROCESS)
        emit_root(job, *software, node_id, ranks_of(rank), t, [ev], 0.8, why, now, cfg, out)


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
                late_evidence(job, s.generation, s.node_id, s.rank, s.evidence, now, cfg, out, dead=True)
            continue
        root = root_for(job, s, cfg)
        if root is not None:
            attribute_symptom(job, root, s, now, cfg, out)
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
                join(existing, s.evidence, out, "exit on a node already reported")
                restart_dead(job, existing, s, now, cfg, out)
            continue
        ranks = tuple(sorted({s.rank for s in mine if s.rank is not None}))
        emit_root(
            job,
            FaultClass.PROCESS_CRASH,
            RepairAction.RESTART_PROCESS,
            node_id,
            ranks,
            min(s.t for s in mine),
            [s.evidence for s in mine],
            0.6,
            f"ranks {list(ranks)} on {node_id} exited after a communication error; "
            f"no other root cause within {window:g}s",
            now,
            cfg,
            out,
        )
    late = [(s, prior_root(job, s, cfg)) for s in logs]
    for s, prior in late:
        if prior is not None:
            attribute(prior, s, out, cfg)
    logs = [s for s, prior in late if prior is None]
    if not logs:
        return
    if job.comm_open is not None and job.comm_open.generation == job.generation:
        for s in logs:
            attribute(job.comm_open, s, out, cfg)
        return
    nodes = tuple(sorted({s.node_id for s in logs}))
    ranks = tuple(sorted({s.rank for s in logs if s.rank is not None}))
    gen = job.generation
    iid = incident_id(job.job_id, gen, FaultClass.COMMUNICATION, nodes, ranks)
    known = job.incidents.get(iid)
    if known is not None:  # a peer instance reported the same errors already
        for s in logs:
            attribute(known, s, out, cfg)
        return
    first = min(s.t for s in logs)
    inc = Incident(
        iid,
        job.job_id,
        gen,
        FaultClass.COMMUNICATION,
        RepairAction.NONE,
        nodes,
        ranks,
        first,
        first,
        now,
        [s.evidence for s in logs[: cfg.max_evidence]],
        0.2,
        f"{len(logs)} communication errors on {len(nodes)} nodes and no crash, node "
        f"loss, hang or hardware fault within {window:g}s: reported for an operator, "
        f"no repair",
        root=False,
    )
    inc.symptoms = len(logs) - 1
    job.comm_open = inc
    emit(job, inc, cfg, out)
