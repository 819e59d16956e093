"""The operator commands with real torch workers: the job is registered and its spare added with
the CLI, the spare is quarantined and later released, and then a crashed rank is replaced onto
it: the released node absorbs the replacement and the job finishes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recovery_services import AT, _cluster

from flashrecovery.shared.registry import Registry

pytestmark = pytest.mark.timeout(600)


def _cli(settings, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHRECOVERY_")}
    env.update(
        FLASHRECOVERY_REDIS_URL=settings.redis_url,
        FLASHRECOVERY_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        FLASHRECOVERY_JOB_ID=settings.job_id,
        FLASHRECOVERY_LOG_FORMAT="json",
    )
    res = subprocess.run(
        [sys.executable, "-m", "flashrecovery", *argv], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, (argv, res.stdout, res.stderr[-2000:])
    return res


def test_a_released_spare_absorbs_a_replacement(stack, tmp_path: Path, monkeypatch):
    # the crash must move its rank (by default a software fault restarts in place)
    monkeypatch.setenv("FLASHRECOVERY_PLANNER__RESTART_IN_PLACE_FOR_SOFTWARE", "false")

    async def go():
        c = _cluster(stack, tmp_path)  # 4 nodes x 2 ranks (tp 2) + the sidecar of spare-0
        s = c.settings
        # Registered from the CLI first: the cluster's own init_job then finds the job and keeps it.
        await asyncio.to_thread(_cli, s, "job", "register", "--nodes", "4", "--ranks-per-node", "2", "--tp", "2")
        await asyncio.to_thread(_cli, s, "node", "add-spare", "spare-0", "--capacity", "2")
        await asyncio.to_thread(_cli, s, "node", "quarantine", "spare-0", "--reason", "burn-in pending")
        reg = Registry.from_url(s.redis_url, s.job_id)
        try:
            await c.start()
            await c.wait_until(lambda: c.min_step() >= 1, 300, "training to start")
            assert str((await reg.get_nodes(["spare-0"]))[0].role) == "quarantined"
            await asyncio.to_thread(_cli, s, "node", "release", "spare-0")
            await c.inject("process-crash", 2, AT)
            await c.wait_until(lambda: any(x.outcome == "done" for x in c.timeline.completed), 300, "recovery")
            await c.wait_until(c.finished, 300, "training to finish")
            done = next(x for x in c.timeline.completed if x.outcome == "done")
            plan = next(p for p in c.timeline.plans if p.plan_id == done.plan_id)
            assert [(r.rank, r.to_node) for r in plan.replacements] == [(2, "spare-0")], plan
            assert 2 in (await reg.get_nodes(["spare-0"]))[0].ranks
            assert done.committed_steps_lost == 0
        finally:
            await reg.close()
            await c.stop()

    asyncio.run(go())
