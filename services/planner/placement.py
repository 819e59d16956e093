"""Where moved ranks go: spare nodes with free standby slots, a faulty node's ranks kept
together on one spare when one has room, preferring spares that share labels (rack, switch)
with the faulty node. Pure; deterministic."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .arrays import ROLE_SPARE, PlanInput


@dataclass(frozen=True)
class Group:
    node: int  # node index the ranks leave
    positions: tuple[int, ...]  # rank positions to move, ascending
    must_move: bool  # True: node replacement; False: a software restart that may stay in place


@dataclass(frozen=True)
class Placement:
    target: dict[int, int]  # rank position -> node index it moves to
    unplaced: tuple[Group, ...]
    reasons: tuple[str, ...]


def free_slots(inp: PlanInput) -> np.ndarray:
    """Standby slots per node, less the ranks a spare already hosts (ranks moved there by an
    earlier plan whose node record was not yet updated): never overbook a spare."""
    hosted = np.diff(inp.node_start)
    return np.maximum(inp.node_slots.astype(np.int64) - hosted, 0)


def spare_pool(inp: PlanInput, excluded: Iterable[int]) -> np.ndarray:
    """Node indices usable as targets: role SPARE, free slots, not excluded (faulty, quarantined)."""
    ok = (inp.node_role == ROLE_SPARE) & (free_slots(inp) > 0)
    ex = np.fromiter(excluded, dtype=np.int64)
    if ex.size:
        ok[ex] = False
    return np.flatnonzero(ok)


def _locality(inp: PlanInput, node: int, spares: np.ndarray) -> np.ndarray:
    labels = inp.node_labels[node]
    score = np.zeros(spares.shape[0], dtype=np.int64)
    if not labels:
        return score
    for i, s in enumerate(spares.tolist()):
        other = inp.node_labels[s]
        score[i] = sum(1 for k, v in labels.items() if other.get(k) == v)
    return score


def place(inp: PlanInput, groups: list[Group], excluded: Iterable[int]) -> Placement:
    """Best fit, biggest groups first: each group goes whole to the spare with the most label
    matches, then the least room left over, then the lowest node id. A group no single spare
    holds is split across spares (most room first); a group that cannot be placed at all is
    returned as unplaced."""
    spares = spare_pool(inp, excluded)  # ascending node index == ascending node id
    free = free_slots(inp)[spares]
    target: dict[int, int] = {}
    unplaced: list[Group] = []
    reasons: list[str] = []
    order = sorted(groups, key=lambda g: (not g.must_move, -len(g.positions), inp.node_ids[g.node]))
    big = np.int64(1 << 20)
    for g in order:
        need = len(g.positions)
        if need == 0:
            continue
        loc = _locality(inp, g.node, spares)
        fits = free >= need
        if fits.any():
            key = np.where(fits, (-loc * big + (free - need)) * big + np.arange(spares.size), np.iinfo(np.int64).max)
            j = int(np.argmin(key))
            free[j] -= need
            for p in g.positions:
                target[p] = int(spares[j])
            if loc.size and loc[j] > 0:
                reasons.append(
                    f"{inp.node_ids[g.node]} -> {inp.node_ids[spares[j]]}: same "
                    f"{', '.join(k for k, v in inp.node_labels[g.node].items() if inp.node_labels[spares[j]].get(k) == v)}"
                )
            continue
        if int(free.sum()) < need:
            unplaced.append(g)
            continue
        # No single spare has room: split, keeping as many ranks together as possible.
        by_room = np.lexsort((np.arange(spares.size), -free, -loc))
        left = list(g.positions)
        used = []
        for j in by_room.tolist():
            take = min(int(free[j]), len(left))
            if take <= 0:
                continue
            for p in left[:take]:
                target[p] = int(spares[j])
            left = left[take:]
            free[j] -= take
            used.append(inp.node_ids[spares[j]])
            if not left:
                break
        reasons.append(f"{inp.node_ids[g.node]}: no spare holds all {need} ranks; split over {', '.join(used)}")
    return Placement(target=target, unplaced=tuple(unplaced), reasons=tuple(reasons))
