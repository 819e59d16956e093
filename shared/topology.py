"""The job's shape as the registry stores it: nodes, ranks and each rank's parallel coordinates.

Ranks with the same `shard_id` hold the same model shard: they are data-parallel replicas of
each other and can restore one another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from .schemas import Frozen, NodeRole, RankState


class RankRecord(Frozen):
    rank: int
    node_id: str
    local_rank: int
    shard_id: int
    dp: int
    tp: int = 0
    pp: int = 0
    pid: int | None = None
    state: RankState = RankState.STARTING
    step: int = -1  # last committed step the registry knows of
    generation: int = 0


class NodeRecord(Frozen):
    node_id: str
    role: NodeRole
    ranks: tuple[int, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)  # rack, switch, nvlink domain
    standby_slots: int = 0


class JobSnapshot(Frozen):
    job_id: str
    generation: int
    committed_step: int
    world_size: int
    dp: int
    tp: int
    pp: int = 1
    ranks: tuple[RankRecord, ...]
    nodes: tuple[NodeRecord, ...]

    def node(self, node_id: str) -> NodeRecord | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


def grid_topology(
    job_id: str,
    nodes: int,
    ranks_per_node: int,
    tp: int,
    pp: int = 1,
    spares: int = 1,
    standby_slots: int | None = None,
    labels: dict[str, dict[str, str]] | None = None,
) -> JobSnapshot:
    """Megatron-style layout: rank = (dp_index * pp + pp_index) * tp + tp_index, so a tensor
    parallel group sits inside a node. shard_id = pp_index * tp + tp_index."""
    world = nodes * ranks_per_node
    if world % (tp * pp):
        raise ValueError(f"world size {world} not divisible by tp*pp={tp * pp}")
    dp = world // (tp * pp)
    ranks = []
    for r in range(world):
        tp_i = r % tp
        pp_i = (r // tp) % pp
        dp_i = r // (tp * pp)
        ranks.append(
            RankRecord(
                rank=r,
                node_id=f"node-{r // ranks_per_node}",
                local_rank=r % ranks_per_node,
                shard_id=pp_i * tp + tp_i,
                dp=dp_i,
                tp=tp_i,
                pp=pp_i,
            )
        )
    labels = labels or {}
    node_recs = [
        NodeRecord(
            node_id=f"node-{i}",
            role=NodeRole.ACTIVE,
            ranks=tuple(range(i * ranks_per_node, (i + 1) * ranks_per_node)),
            labels=labels.get(f"node-{i}", {}),
        )
        for i in range(nodes)
    ]
    slots = ranks_per_node if standby_slots is None else standby_slots
    node_recs += [
        NodeRecord(node_id=f"spare-{i}", role=NodeRole.SPARE, standby_slots=slots, labels=labels.get(f"spare-{i}", {}))
        for i in range(spares)
    ]
    return JobSnapshot(
        job_id=job_id,
        generation=0,
        committed_step=-1,
        world_size=world,
        dp=dp,
        tp=tp,
        pp=pp,
        ranks=tuple(ranks),
        nodes=tuple(node_recs),
    )


TOPOLOGY_VERSION = "topology_version"  # meta field: bumped by every write of rank/node records


def meta_ints(meta: Mapping[bytes, Any] | Mapping[str, Any]) -> dict[str, int]:
    """A job's registry meta hash as read (generation, committed_step, world_size, dp, tp, pp,
    topology_version), keys as str."""
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in meta.items()}


def spec_topology(
    job_id: str,
    nodes: dict[str, list[int]],
    tp: int = 1,
    pp: int = 1,
    spares: dict[str, int] | None = None,
    labels: dict[str, dict[str, str]] | None = None,
) -> JobSnapshot:
    """A job from an explicit placement (`flashrecovery job register --file`): node id -> the
    global ranks it hosts (local rank = position in the list), spare node id -> its standby
    slots. Coordinates follow grid_topology's Megatron layout. ValueError names what is wrong."""
    spares = spares or {}
    labels = labels or {}
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    both = sorted(set(nodes) & set(spares))
    if both:
        raise ValueError(f"nodes {both} are listed both as active and as spare")
    for n in [*nodes, *spares]:
        if not n or any(c in n for c in "{}: ,"):
            raise ValueError(f"node id {n!r} must be non-empty without braces, colons, commas or spaces")
    placed = [r for ranks in nodes.values() for r in ranks]
    world = len(placed)
    if world == 0:
        raise ValueError("no ranks: give at least one node with ranks")
    if sorted(placed) != list(range(world)):
        dup = sorted({r for r in placed if placed.count(r) > 1})
        raise ValueError(
            f"ranks must be 0..{world - 1}, each on exactly one node"
            + (f" (listed twice: {dup[:10]})" if dup else f" (got {sorted(placed)[:10]}...)")
        )
    if world % (tp * pp):
        raise ValueError(f"world size {world} not divisible by tp*pp={tp * pp}")
    bad = {n: s for n, s in spares.items() if s < 1}
    if bad:
        raise ValueError(f"spare capacity must be >= 1: {bad}")
    ranks = []
    for node_id, hosted in nodes.items():
        for local, r in enumerate(hosted):
            tp_i, pp_i, dp_i = r % tp, (r // tp) % pp, r // (tp * pp)
            ranks.append(
                RankRecord(
                    rank=r, node_id=node_id, local_rank=local, shard_id=pp_i * tp + tp_i, dp=dp_i, tp=tp_i, pp=pp_i
                )
            )
    node_recs = [
        NodeRecord(node_id=n, role=NodeRole.ACTIVE, ranks=tuple(rs), labels=labels.get(n, {}))
        for n, rs in nodes.items()
    ]
    node_recs += [
        NodeRecord(node_id=n, role=NodeRole.SPARE, standby_slots=s, labels=labels.get(n, {})) for n, s in spares.items()
    ]
    return JobSnapshot(
        job_id=job_id,
        generation=0,
        committed_step=-1,
        world_size=world,
        dp=world // (tp * pp),
        tp=tp,
        pp=pp,
        ranks=tuple(sorted(ranks, key=lambda r: r.rank)),
        nodes=tuple(node_recs),
    )


# ---------------------------------------------------------------- operators' node changes
# Pure: the current record (None = unknown node) -> the new one, or ValueError saying why not.
# Registry.change_node writes the result by compare-and-set.


def as_spare(cur: NodeRecord | None, node_id: str, capacity: int, labels: dict[str, str] | None = None) -> NodeRecord:
    """`node add-spare`: a new node joins the standby pool (or a spare's capacity changes)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 (standby slots), got {capacity}")
    if not node_id or any(c in node_id for c in "{}: ,"):
        raise ValueError(f"node id {node_id!r} must be non-empty without braces, colons, commas or spaces")
    if cur is None:
        return NodeRecord(node_id=node_id, role=NodeRole.SPARE, standby_slots=capacity, labels=labels or {})
    if cur.role is NodeRole.QUARANTINED:
        raise ValueError(f"{node_id} is quarantined: bring it back with `flashrecovery node release {node_id}`")
    if cur.role is NodeRole.ACTIVE:
        raise ValueError(f"{node_id} is active (ranks {list(cur.ranks)}): it is not a spare to add")
    return cur.model_copy(update={"standby_slots": capacity, "labels": labels if labels is not None else cur.labels})


def as_quarantined(cur: NodeRecord | None, node_id: str) -> NodeRecord:
    """`node quarantine`: the planner places no rank on it and the detector stops watching it.
    A node that still hosts ranks is refused: moving them off is a recovery, not a registry edit
    (fault it, or let the planner quarantine it at its repeated faults)."""
    if cur is None:
        raise ValueError(f"{node_id} is not a node of the job")
    if cur.ranks:
        raise ValueError(
            f"{node_id} hosts ranks {list(cur.ranks)}: only a node without ranks (a spare, or one "
            "the job already moved off) can be quarantined by hand"
        )
    return cur.model_copy(update={"role": NodeRole.QUARANTINED})


def as_released(cur: NodeRecord | None, node_id: str, capacity: int | None) -> NodeRecord:
    """`node release`: a repaired quarantined node becomes a spare again, so the planner can
    place replaced ranks on it. A node quarantined after a fault kept no standby slots (it was
    an active node): then `capacity` is needed."""
    if cur is None:
        raise ValueError(f"{node_id} is not a node of the job")
    if cur.role is not NodeRole.QUARANTINED:
        raise ValueError(f"{node_id} is {cur.role.value}, not quarantined: nothing to release")
    if cur.ranks:
        raise ValueError(f"{node_id} still hosts ranks {list(cur.ranks)}: cannot become a spare")
    slots = capacity if capacity is not None else cur.standby_slots
    if slots < 1:
        raise ValueError(f"{node_id} has no standby slots on record: give --capacity N (the ranks it can host)")
    return cur.model_copy(update={"role": NodeRole.SPARE, "standby_slots": slots})
