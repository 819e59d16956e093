"""Admission: what a worker event may claim, checked against the registry's view of the job
before it changes any detector state. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
