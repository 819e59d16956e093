"""LocalCluster.diagnosis: what a timed-out wait reports, where only its message survives (CI)."""

from __future__ import annotations

import asyncio

import pytest

from flashrecovery.cluster import LocalCluster, WorkerSpec
from flashrecovery.shared.schemas import NodeHeartbeat, RankState, RankStatus
from flashrecovery.shared.settings import Settings


def _cluster(tmp_path) -> LocalCluster:
    return LocalCluster(Settings(job_id="diag"), tmp_path, WorkerSpec(module="some.job"), nodes=1)


def test_a_timed_out_wait_names_each_rank_and_the_workers_last_lines(tmp_path):
    c = _cluster(tmp_path)
    ranks = tuple(
        RankStatus(rank=r, local_rank=r, pid=100 + r, state=RankState.RUNNING, step=3 + r, proc_state="S")
        for r in range(2)
    )
    hb = NodeHeartbeat(job_id="diag", generation=0, producer="test", node_id="node-0", seq=1, ranks=ranks)
    c.timeline.heartbeats["node-0"] = hb
    log = tmp_path / "sidecars" / "node-0" / "rank1.log"
    log.parent.mkdir(parents=True)
    log.write_text("first\nsecond\nstuck in the grad sync\n")

    with pytest.raises(TimeoutError) as err:
        asyncio.run(c.wait_until(lambda: False, 0.01, "never"))
    text = str(err.value)
    assert "waiting for never" in text
    assert "1: node-0 step 4 gen 0 running S" in text and "pid 101" in text
    assert "node-0/rank1.log: stuck in the grad sync" in text
