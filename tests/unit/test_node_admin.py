"""The pure side of the operator commands: topologies from a placement, and the node changes
`node add-spare / quarantine / release` write (refusals say why)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from flashrecovery.admin import topology_from_args
from flashrecovery.shared.schemas import NodeRole
from flashrecovery.shared.settings import ConfigError
from flashrecovery.shared.topology import (
    NodeRecord,
    as_quarantined,
    as_released,
    as_spare,
    grid_topology,
    spec_topology,
)


def test_a_placement_gets_the_grid_coordinates() -> None:
    grid = grid_topology("j", nodes=2, ranks_per_node=2, tp=2, spares=1, standby_slots=2)
    spec = spec_topology("j", {"node-0": [0, 1], "node-1": [2, 3]}, tp=2, spares={"spare-0": 2})
    assert spec == grid


def test_a_placement_with_its_own_order_and_labels() -> None:
    s = spec_topology("j", {"b": [3, 1], "a": [0, 2]}, tp=1, spares={"s": 1}, labels={"s": {"rack": "r1"}})
    assert [(r.rank, r.node_id, r.local_rank, r.dp) for r in s.ranks] == [
        (0, "a", 0, 0),
        (1, "b", 1, 1),
        (2, "a", 1, 2),
        (3, "b", 0, 3),
    ]
    assert s.node("s") == NodeRecord(node_id="s", role=NodeRole.SPARE, standby_slots=1, labels={"rack": "r1"})


@pytest.mark.parametrize(
    "nodes, kw, why",
    [
        ({"a": [0, 2]}, {}, "ranks must be 0..1"),
        ({"a": [0, 1], "b": [1]}, {}, "listed twice: [1]"),
        ({"a": [0, 1, 2]}, {"tp": 2}, "not divisible"),
        ({"a": [0]}, {"spares": {"a": 1}}, "both as active and as spare"),
        ({"a:b": [0]}, {}, "node id"),
        ({"a": [0]}, {"spares": {"s": 0}}, "capacity must be >= 1"),
        ({}, {}, "no ranks"),
    ],
)
def test_a_bad_placement_is_refused_with_the_reason(nodes, kw, why) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        spec_topology("j", nodes, **kw)


def _args(**kw) -> argparse.Namespace:
    base = dict(file=None, nodes=None, ranks_per_node=None, tp=1, pp=1, spares=0, spare_capacity=None)
    return argparse.Namespace(**{**base, **kw})


def test_register_flags_and_file(tmp_path: Path) -> None:
    assert topology_from_args(_args(nodes=2, ranks_per_node=2, tp=2, spares=1), "j").world_size == 4
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"tp": 2, "nodes": {"n0": [0, 1], "n1": [2, 3]}, "spares": {"s0": 2}}))
    assert topology_from_args(_args(file=f), "j").node("s0").standby_slots == 2
    for bad, why in [
        (_args(), "--nodes and --ranks-per-node"),
        (_args(file=f, nodes=2), "not both"),
        (_args(file=tmp_path / "missing.json"), "No such file"),
    ]:
        with pytest.raises(ConfigError, match=why):
            topology_from_args(bad, "j")
    f.write_text(json.dumps({"job_id": "other", "nodes": {"n0": [0]}}))
    with pytest.raises(ConfigError, match="for job 'other'"):
        topology_from_args(_args(file=f), "j")
    f.write_text(json.dumps({"nodes": {"n0": [0]}, "sparez": {}}))
    with pytest.raises(ConfigError, match="unknown keys"):
        topology_from_args(_args(file=f), "j")


SPARE = NodeRecord(node_id="s", role=NodeRole.SPARE, standby_slots=2)
ACTIVE = NodeRecord(node_id="a", role=NodeRole.ACTIVE, ranks=(0, 1))
# A node the executor quarantined after its fault: its ranks moved away, no standby slots.
FAULTED = NodeRecord(node_id="f", role=NodeRole.QUARANTINED, ranks=())


def test_add_spare_new_or_resized_but_never_an_active_or_quarantined_node() -> None:
    assert as_spare(None, "n", 4, {"rack": "x"}) == NodeRecord(
        node_id="n", role=NodeRole.SPARE, standby_slots=4, labels={"rack": "x"}
    )
    assert as_spare(SPARE, "s", 3).standby_slots == 3
    with pytest.raises(ValueError, match="is active"):
        as_spare(ACTIVE, "a", 2)
    with pytest.raises(ValueError, match="node release f"):
        as_spare(FAULTED, "f", 2)
    with pytest.raises(ValueError, match="capacity"):
        as_spare(None, "n", 0)


def test_quarantine_only_a_node_without_ranks() -> None:
    assert as_quarantined(SPARE, "s").role is NodeRole.QUARANTINED
    assert as_quarantined(SPARE, "s").standby_slots == 2  # kept for its release
    with pytest.raises(ValueError, match="hosts ranks"):
        as_quarantined(ACTIVE, "a")
    with pytest.raises(ValueError, match="not a node"):
        as_quarantined(None, "x")


def test_release_makes_a_spare_again_with_its_capacity() -> None:
    assert as_released(as_quarantined(SPARE, "s"), "s", None) == SPARE
    assert as_released(FAULTED, "f", 2) == NodeRecord(node_id="f", role=NodeRole.SPARE, standby_slots=2)
    with pytest.raises(ValueError, match="--capacity"):
        as_released(FAULTED, "f", None)
    with pytest.raises(ValueError, match="not quarantined"):
        as_released(SPARE, "s", None)
