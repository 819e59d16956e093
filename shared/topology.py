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


def grid_topology(job_id: str, nodes: int, ranks_per_node: int, tp: int, pp: int = 1,
                  spares: int = 1, standby_slots: int | None = None,
                  labels: dict[str, dict[str, str]] | None = None) -> JobSnapshot:
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
        ranks.append(RankRecord(rank=r, node_id=f"node-{r // ranks_per_node}",
                                local_rank=r % ranks_per_node, shard_id=pp_i * tp + tp_i,
                                dp=dp_i, tp=tp_i, pp=pp_i))
    labels = labels or {}
    node_recs = [NodeRecord(node_id=f"node-{i}", role=NodeRole.ACTIVE,
                            ranks=tuple(range(i * ranks_per_node, (i + 1) * ranks_per_node)),
                            labels=labels.get(f"node-{i}", {}))
                 for i in range(nodes)]
    slots = ranks_per_node if standby_slots is None else standby_slots
    node_recs += [NodeRecord(node_id=f"spare-{i}", role=NodeRole.SPARE, standby_slots=slots,
                             labels=labels.get(f"spare-{i}", {}))
                  for i in range(spares)]
    return JobSnapshot(job_id=job_id, generation=0, committed_step=-1, world_size=world, dp=dp,
                       tp=tp, pp=pp, ranks=tuple(ranks), nodes=tuple(node_recs))


TOPOLOGY_VERSION = "topology_version"  # meta field: bumped by every write of rank/node records


def meta_ints(meta: Mapping[bytes, Any] | Mapping[str, Any]) -> dict[str, int]:
    """A job's registry meta hash as read (generation, committed_step, world_size, dp, tp, pp,
    topology_version), keys as str."""
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in meta.items()}
