"""The one replica rule (shared/replicas.py): the agent's source check and the planner's layout
agree on which ranks are replicas of each other."""

from __future__ import annotations

import pytest

from flashrecovery.shared.replicas import tp_shard
from flashrecovery.shared.topology import grid_topology

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("nodes,per_node,tp", [(4, 2, 2), (2, 4, 4), (3, 2, 1), (2, 8, 4)])
def test_agent_shard_check_matches_the_registered_layout(nodes: int, per_node: int, tp: int) -> None:
    snap = grid_topology("j", nodes, per_node, tp)
    assert {r.rank: r.shard_id for r in snap.ranks} == {r.rank: tp_shard(r.rank, tp) for r in snap.ranks}
