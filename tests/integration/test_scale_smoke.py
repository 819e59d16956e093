"""The scale bench's smoke point on the real control plane (detector, planner, executor, broker,
Redis) with simulated sidecars: one node of 125 (1,000 ranks) stops beating and every rank resumes. With
the in-band commit decision a recovery costs acks from the changed nodes only: no healthy node
reports its pause (issue #14 item 2)."""

from __future__ import annotations

import asyncio

import pytest

from flashrecovery.bench.scale import run_scale_point
from flashrecovery.shared.settings import Settings

pytestmark = pytest.mark.timeout(150)


def test_node_loss_recovers_with_acks_from_the_changed_nodes_only(tmp_path):
    point = asyncio.run(run_scale_point(1000, tmp_path, Settings(), warmup_s=6.0, timeout_s=90.0))
    assert point["outcome"] == "done" and point["fault_class"] == "node_lost"
    assert point["restarted_ranks"] == 8 and point["detector_instances"] == 1
    survivors = point["nodes"] - 1
    acks = point["kafka_messages"]["acks"]
    # no pause report (the lost node hosted every rank being replaced), replace from the spare,
    # and rebuilt/restored/resumed/verified from the stage nodes only: the spare and the nodes
    # of the 8 transfer sources. Reports from the survivors would be one per node, 124.
    stage_acks = acks - 1
    assert stage_acks % 4 == 0 and 1 <= stage_acks // 4 <= 1 + 8
    assert acks < survivors / 3
    assert point["kafka_messages"]["commands"] == 3
    assert point["detection_s"] is not None and point["detection_s"] < 6.0
