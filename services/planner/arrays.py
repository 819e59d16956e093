"""The snapshot as numpy arrays: the planner's vectorised view of a job.

Building a `PlanInput` is O(ranks) Python work (one pass over the rank records); planning over
it is array operations plus work per restarted rank. `PlanInput.from_snapshot` keeps the last
build so a caller that plans several times over one snapshot object pays for it once.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from flashrecovery.shared.schemas import NodeRole, RankState
from flashrecovery.shared.topology import JobSnapshot, NodeRecord, meta_ints

ROLE_ACTIVE, ROLE_SPARE, ROLE_QUARANTINED = 0, 1, 2
_ROLE_CODE = {NodeRole.ACTIVE: ROLE_ACTIVE, NodeRole.SPARE: ROLE_SPARE, NodeRole.QUARANTINED: ROLE_QUARANTINED}


@dataclass(frozen=True, eq=False)
class PlanInput:
    """Immutable arrays over one snapshot. Rank arrays are indexed by position (ranks sorted by
    id); node arrays by node index (node ids sorted)."""

    job_id: str
    generation: int
    committed_step: int
    world_size: int
    dp: int
    tp: int
    pp: int
    node_ids: tuple[str, ...]
    node_index: dict[str, int]
    node_role: np.ndarray  # int8 per node
    node_slots: np.ndarray  # int32 per node: free standby slots
    node_labels: tuple[dict[str, str], ...]
    rank: np.ndarray  # int64 rank id per position, ascending
    node_of: np.ndarray  # int32 node index per position
    shard: np.ndarray  # int32
    dp_of: np.ndarray
    tp_of: np.ndarray
    pp_of: np.ndarray
    local_rank: np.ndarray
    recovering: np.ndarray  # bool: moved by a superseded plan, not restored yet
    # Ranks grouped by node: positions node_order[node_start[i]:node_start[i+1]] live on node i.
    node_order: np.ndarray
    node_start: np.ndarray
    # Ranks grouped by shard, interleaved across nodes inside a shard (first replica on each
    # node, then the second, ...) so taking a prefix spreads restores over nodes.
    shard_ids: np.ndarray  # sorted distinct shard ids
    shard_order: np.ndarray
    shard_start: np.ndarray

    @property
    def n_ranks(self) -> int:
        return int(self.rank.shape[0])

    def positions(self, ranks: Any) -> np.ndarray:
        """Rank ids -> positions; -1 for ids not in the job."""
        ids = np.asarray(ranks, dtype=np.int64).reshape(-1)
        if self.n_ranks == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.rank, ids), self.n_ranks - 1)
        return np.where(self.rank[pos] == ids, pos, -1)

    def ranks_on(self, node: int) -> np.ndarray:
        return self.node_order[self.node_start[node] : self.node_start[node + 1]]

    def shard_members(self, shard_id: int) -> np.ndarray:
        i = int(np.searchsorted(self.shard_ids, shard_id))
        if i >= self.shard_ids.shape[0] or self.shard_ids[i] != shard_id:
            return np.empty(0, dtype=np.int64)
        return self.shard_order[self.shard_start[i] : self.shard_start[i + 1]]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_snapshot(cls, snap: JobSnapshot) -> PlanInput:
        with _cache_lock:
            if _cache.get("snap") is snap:
                cached: PlanInput = _cache["input"]
                return cached
        built = cls.build(snap)
        with _cache_lock:
            _cache.update(snap=snap, input=built)
        return built

    @classmethod
    def build(cls, snap: JobSnapshot) -> PlanInput:
        recs = sorted(snap.ranks, key=lambda r: r.rank)
        node_recs: dict[str, NodeRecord] = {n.node_id: n for n in snap.nodes}
        names = set(node_recs)
        names.update(r.node_id for r in recs)
        node_ids = tuple(sorted(names))
        node_index = {n: i for i, n in enumerate(node_ids)}
        n = len(recs)
        cols = np.fromiter(
            (
                v
                for r in recs
                for v in (
                    r.rank,
                    node_index[r.node_id],
                    r.shard_id,
                    r.dp,
                    r.tp,
                    r.pp,
                    r.local_rank,
                    r.state == RankState.RECOVERING,
                )
            ),
            dtype=np.int64,
            count=8 * n,
        ).reshape(n, 8)
        roles = np.array(
            [_ROLE_CODE[node_recs[x].role] if x in node_recs else ROLE_ACTIVE for x in node_ids], dtype=np.int8
        )
        slots = np.array([node_recs[x].standby_slots if x in node_recs else 0 for x in node_ids], dtype=np.int32)
        labels = tuple(dict(node_recs[x].labels) if x in node_recs else {} for x in node_ids)
        return cls.from_columns(
            job_id=snap.job_id,
            generation=snap.generation,
            committed_step=snap.committed_step,
            world_size=snap.world_size,
            dp=snap.dp,
            tp=snap.tp,
            pp=snap.pp,
            node_ids=node_ids,
            node_role=roles,
            node_slots=slots,
            node_labels=labels,
            rank=cols[:, 0],
            node_of=cols[:, 1],
            shard=cols[:, 2],
            dp_of=cols[:, 3],
            tp_of=cols[:, 4],
            pp_of=cols[:, 5],
            local_rank=cols[:, 6],
            recovering=cols[:, 7].astype(bool),
        )

    @classmethod
    def from_rows(
        cls, job_id: str, meta: Mapping[str, Any], ranks: Iterable[bytes | str], nodes: Iterable[bytes | str]
    ) -> PlanInput:
        """The registry's raw hashes (meta fields, RankRecord / NodeRecord JSON values) straight
        to arrays, without a pydantic object per rank: the records were validated when written.
        Several times cheaper than building a JobSnapshot first at 100k ranks."""
        pick = itemgetter("rank", "node_id", "shard_id", "dp", "tp", "pp", "local_rank", "state")
        # RankRecord JSON always has every field. The cyclic GC is paused while 100k short-lived
        # dicts are made: they hold no cycles, and collections would double the cost.
        paused = gc.isenabled()
        gc.disable()
        try:
            rows = [pick(orjson.loads(v)) for v in ranks]
        finally:
            if paused:
                gc.enable()
        ns = {d["node_id"]: d for d in map(orjson.loads, nodes)}
        rank_c, node_c, shard_c, dp_c, tp_c, pp_c, lr_c, st_c = (
            (list(c) for c in zip(*rows)) if rows else ([] for _ in range(8))
        )
        node_ids = tuple(sorted(set(ns).union(node_c)))
        idx = {x: i for i, x in enumerate(node_ids)}
        rank_a = np.array(rank_c, dtype=np.int64)
        order = np.argsort(rank_a, kind="stable")
        recovering = RankState.RECOVERING.value

        def col(values: list[Any]) -> np.ndarray:
            return np.array(values, dtype=np.int64)[order]

        empty: dict[str, Any] = {}
        m = meta_ints(meta)
        return cls.from_columns(
            job_id=job_id,
            generation=m["generation"],
            committed_step=m.get("committed_step", -1),
            world_size=m["world_size"],
            dp=m["dp"],
            tp=m["tp"],
            pp=m.get("pp", 1),
            node_ids=node_ids,
            node_role=[_ROLE_CODE[NodeRole(ns.get(x, empty).get("role", "active"))] for x in node_ids],
            node_slots=[ns.get(x, empty).get("standby_slots", 0) for x in node_ids],
            node_labels=tuple(dict(ns.get(x, empty).get("labels") or {}) for x in node_ids),
            rank=rank_a[order],
            node_of=col([idx[x] for x in node_c]),
            shard=col(shard_c),
            dp_of=col(dp_c),
            tp_of=col(tp_c),
            pp_of=col(pp_c),
            local_rank=col(lr_c),
            recovering=np.array([x == recovering for x in st_c], dtype=bool)[order],
        )

    @classmethod
    def from_columns(
        cls,
        *,
        job_id: str,
        generation: int,
        committed_step: int,
        world_size: int,
        dp: int,
        tp: int,
        pp: int,
        node_ids: tuple[str, ...],
        node_role: Any,
        node_slots: Any,
        node_labels: tuple[dict[str, str], ...],
        rank: Any,
        node_of: Any,
        shard: Any,
        dp_of: Any,
        tp_of: Any,
        pp_of: Any,
        local_rank: Any,
        recovering: Any,
    ) -> PlanInput:
        """The fast path: columns straight from a store, no per-rank objects. `rank` must be
        ascending."""
        rank = np.asarray(rank, dtype=np.int64)
        node_of = np.asarray(node_of, dtype=np.int32)
        shard = np.asarray(shard, dtype=np.int32)
        n_nodes = len(node_ids)
        node_order = np.argsort(node_of, kind="stable")
        counts = np.bincount(node_of, minlength=n_nodes)
        node_start = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        # occurrence of each rank among its shard's ranks on the same node (0 = first there)
        by_shard_node = np.lexsort((rank, node_of, shard))
        s_sorted, n_sorted = shard[by_shard_node], node_of[by_shard_node]
        new_group = np.ones(rank.shape[0], dtype=bool)
        new_group[1:] = (s_sorted[1:] != s_sorted[:-1]) | (n_sorted[1:] != n_sorted[:-1])
        group_first = np.maximum.accumulate(np.where(new_group, np.arange(rank.shape[0]), 0))
        occ = np.empty(rank.shape[0], dtype=np.int64)
        occ[by_shard_node] = np.arange(rank.shape[0]) - group_first
        shard_order = np.lexsort((rank, node_of, occ, shard))
        shard_ids, shard_counts = np.unique(shard, return_counts=True)
        shard_start = np.concatenate(([0], np.cumsum(shard_counts))).astype(np.int64)
        for arr in (rank, node_of, shard):
            arr.setflags(write=False)
        return cls(
            job_id=job_id,
            generation=generation,
            committed_step=committed_step,
            world_size=world_size,
            dp=dp,
            tp=tp,
            pp=pp,
            node_ids=tuple(node_ids),
            node_index={x: i for i, x in enumerate(node_ids)},
            node_role=np.asarray(node_role, dtype=np.int8),
            node_slots=np.asarray(node_slots, dtype=np.int32),
            node_labels=tuple(node_labels),
            rank=rank,
            node_of=node_of,
            shard=shard,
            dp_of=np.asarray(dp_of, dtype=np.int32),
            tp_of=np.asarray(tp_of, dtype=np.int32),
            pp_of=np.asarray(pp_of, dtype=np.int32),
            local_rank=np.asarray(local_rank, dtype=np.int32),
            recovering=np.asarray(recovering, dtype=bool),
            node_order=node_order,
            node_start=node_start,
            shard_ids=shard_ids,
            shard_order=shard_order,
            shard_start=shard_start,
        )


_cache: dict[str, Any] = {}
_cache_lock = threading.Lock()
