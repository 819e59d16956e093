"""Which ranks are replicas of each other, and which replica serves a restarted rank's state.

The one replica rule of the project (the planner chooses with it; the agent checks a source
against it before copying): ranks with the same `shard_id` (shared/topology.py: pp index * tp +
tp index) hold the same model shard and are data-parallel replicas of one another. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


def tp_shard(rank: int, tp: int) -> int:
    """The shard of `rank` in a job without pipeline stages, where shard_id = rank % tp
    (shared/topology.py lays tensor-parallel ranks out consecutively)."""
    return rank % tp


class ReplicaLayout(Protocol):
    """The job's rank layout as the chooser reads it (planner.arrays.PlanInput fits)."""

    @property
    def rank(self) -> np.ndarray: ...  # global rank at each position
    @property
    def shard(self) -> np.ndarray: ...  # shard id at each position
    @property
    def node_of(self) -> np.ndarray: ...  # node index at each position
    @property
    def node_ids(self) -> Sequence[str]: ...

    def shard_members(self, shard_id: int) -> np.ndarray: ...


def choose_sources(
    layout: ReplicaLayout, restart_pos: np.ndarray, healthy: np.ndarray
) -> tuple[list[dict[str, int]], list[int]]:
    """One healthy replica (same shard id) per restarted rank. Within a shard each replica
    serves at most one restore more than any other; across shards, nodes already serving a
    restore are passed over while another node can serve. Returns (transfers as
    {"src", "dst"} rank pairs sorted by dst, shards with no healthy replica)."""
    node_load = np.zeros(len(layout.node_ids), dtype=np.int64)
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    lost: list[int] = []
    shards = layout.shard[restart_pos]
    for s in np.unique(shards).tolist():
        dst = restart_pos[shards == s]
        cand = layout.shard_members(s)
        cand = cand[healthy[cand]]
        if cand.size == 0:
            lost.append(int(s))
            continue
        full, rem = divmod(dst.size, cand.size)
        picks = [np.tile(cand, full)] if full else []
        if rem:
            load = node_load[layout.node_of[cand]]
            idle = np.flatnonzero(load == 0)
            chosen = idle[:rem] if idle.size >= rem else np.argsort(load, kind="stable")[:rem]
            picks.append(cand[chosen])
        src = np.concatenate(picks)
        np.add.at(node_load, layout.node_of[src], 1)
        srcs.append(src)
        dsts.append(dst)
    if not dsts:
        return [], lost
    src_r, dst_r = layout.rank[np.concatenate(srcs)], layout.rank[np.concatenate(dsts)]
    order = np.argsort(dst_r, kind="stable")
    return [{"src": a, "dst": b} for a, b in zip(src_r[order].tolist(), dst_r[order].tolist())], lost
