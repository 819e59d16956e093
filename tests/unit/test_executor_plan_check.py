"""core.plan_refusal: every plan is checked against the registry before its first command."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from test_planner_properties import decide, scenarios  # the planner's own random scenarios

from flashrecovery.executor.core import named_nodes, plan_refusal
from flashrecovery.shared.schemas import NodeRole, RecoveryPlan, Replacement, Transfer
from flashrecovery.shared.topology import grid_topology

SNAP = grid_topology("j", nodes=4, ranks_per_node=2, tp=2, spares=1)


def _good(**update) -> RecoveryPlan:
    p = RecoveryPlan(
        job_id="j",
        generation=0,
        producer="planner",
        plan_id="plan-1",
        incident_ids=("i",),
        target_generation=1,
        world_size=8,
        restart_ranks=(2, 3),
        faulty_nodes=("node-1",),
        replacements=(
            Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0),
            Replacement(rank=3, from_node="node-1", to_node="spare-0", local_rank=1),
        ),
        transfers=(Transfer(src=6, dst=2), Transfer(src=7, dst=3)),
        recovery_step=5,
    )
    return p.model_copy(update=update)


def _check(plan: RecoveryPlan, snap=SNAP, stored: RecoveryPlan | None | str = "same", generation=None):
    nodes = {n.node_id: n for n in snap.nodes if n.node_id in named_nodes(plan)}
    return plan_refusal(
        plan,
        generation=snap.generation if generation is None else generation,
        world_size=snap.world_size,
        rank_nodes={r.rank: r.node_id for r in snap.ranks},
        nodes_by_id=nodes,
        stored=plan if stored == "same" else stored,
    )


def test_a_sound_plan_passes() -> None:
    assert _check(_good()) is None


@pytest.mark.parametrize(
    "update, why",
    [
        ({"restart_ranks": (10**9,), "replacements": (), "transfers": ()}, "restart ranks not in the topology"),
        ({"world_size": -1}, "world size -1"),
        ({"world_size": 16}, "world size 16"),
        ({"restart_ranks": ()}, "no rank to restart"),
        ({"restart_ranks": (2, 2, 3)}, "restarted twice"),
        ({"faulty_nodes": ("node-99",)}, "nodes not in the registry"),
        ({"quarantine_nodes": ("ghost",)}, "nodes not in the registry"),
        (
            {"replacements": (Replacement(rank=2, from_node="node-1", to_node="evil", local_rank=0),)},
            "nodes not in the registry",
        ),
        (
            {"replacements": (Replacement(rank=5, from_node="node-2", to_node="spare-0", local_rank=0),)},
            "does not restart",
        ),
        (
            {"replacements": (Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=-3),)},
            "local rank -3",
        ),
        (
            {"replacements": (Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0),) * 2},
            "replaced twice",
        ),
        (
            {
                "replacements": (
                    Replacement(rank=2, from_node="node-1", to_node="node-2", local_rank=0, mode="in_place"),
                )
            },
            "in-place",
        ),
        ({"transfers": (Transfer(src=10**9, dst=2),)}, "not in the topology"),
        ({"transfers": (Transfer(src=6, dst=-1),)}, "not in the topology"),
        ({"transfers": (Transfer(src=3, dst=2),)}, "source 3 is itself restarted"),
        ({"transfers": (Transfer(src=6, dst=4),)}, "does not restart"),
        ({"target_generation": 10**6}, "ahead of the registry"),
    ],
)
def test_an_invalid_plan_is_refused_with_the_reason(update, why) -> None:
    reason = _check(_good(**update))
    assert reason is not None and why in reason, reason


def test_a_plan_the_planner_did_not_record_is_refused() -> None:
    assert "not in the registry" in _check(_good(), stored=None)
    assert "differs" in _check(_good(restart_ranks=(2,)), stored=_good())


def test_a_replacement_onto_a_quarantined_node_is_refused() -> None:
    snap = SNAP.model_copy(
        update={
            "nodes": tuple(
                n.model_copy(update={"role": NodeRole.QUARANTINED}) if n.node_id == "spare-0" else n for n in SNAP.nodes
            )
        }
    )
    assert "quarantined" in _check(_good(), snap=snap)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_plan_the_planner_makes_passes(scenario) -> None:
    snap, incidents, policy, history = scenario
    d = decide(snap, incidents, policy, history)
    if isinstance(d, RecoveryPlan):
        assert _check(d, snap=snap) is None
