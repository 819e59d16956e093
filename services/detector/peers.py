"""Several detector instances: incidents published by a peer instance (`observe_incident`),
and the nodes that move between instances in a rebalance (`release_nodes`, `expect_nodes`).
Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flashrecovery.shared.schemas import FaultClass, NodeRole

from .config import Config, Decision
from .correlate import attribute_symptom, explained
from .state import INF, DetectorState, Incident, RankView


def observe_incident(
    state: DetectorState, incident: Any, now: float, cfg: Config
) -> tuple[DetectorState, list[Decision]]:
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
        out.append(
            Decision(
                "dropped",
                job.job_id,
                gen,
                f"incident from {incident.producer} of old generation {gen}",
                incident_id=iid,
                fault_class=incident.fault_class,
            )
        )
        return state, out
    if iid in job.incidents:
        state.count("duplicate_incidents")
        return state, out
    cls = incident.fault_class
    took = max(0.0, incident.detected_at - incident.first_seen_at)
    fault_time = now - took
    nodes = tuple(sorted(incident.root_cause_nodes))
    root = cls is not FaultClass.COMMUNICATION
    inc = Incident(
        iid,
        job.job_id,
        gen,
        cls,
        incident.action,
        nodes,
        tuple(sorted(incident.root_cause_ranks)),
        fault_time,
        fault_time,
        now,
        list(incident.evidence)[: cfg.max_evidence],
        incident.confidence,
        incident.reason,
        root=root,
    )
    inc.symptoms = incident.symptoms_attributed
    inc.origin = incident.producer
    job.incidents[iid] = inc
    state.count("peer_incidents")
    absorbed = 0
    if root:
        for n in nodes:
            job.by_node.setdefault((gen, n), inc)
        job.roots.append(inc)
        for s in explained(job, inc, cfg):
            attribute_symptom(job, inc, s, now, cfg, out)
            absorbed += 1
    elif gen == job.generation and job.comm_open is None:
        job.comm_open = inc
    out.append(
        Decision(
            "noted",
            job.job_id,
            gen,
            f"{cls.value} on {','.join(nodes)} reported by {incident.producer}; "
            f"{absorbed} held symptoms attributed to it",
            incident_id=iid,
            fault_class=cls,
            node_id=",".join(nodes),
        )
    )
    return state, out


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


def expect_nodes(
    state: DetectorState, job_id: str, nodes: Iterable[tuple[str, tuple[tuple[int, int], ...]]], now: float, cfg: Config
) -> int | None:
    """Nodes of partitions this instance took over in a rebalance, from the registry topology:
    (node id, ((rank, local rank), ...)). A node already heard of here is left alone; one never
    heard of is watched as if it had beaten at `now` (the handover), so a node that died before
    the handover and never beats again is reported lost after the usual misses. Returns how many
    nodes were seeded, or None while the job is not heard here at all (no node beat within
    quiet_factor intervals): a finished or not yet started job has nobody to expect."""
    job = state.jobs.get(job_id)
    n = 0 if job is None else len(job.by_idx)
    if job is None or n == 0 or not bool((now - job.last_seen[:n] <= cfg.quiet_factor * job.interval[:n]).any()):
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
