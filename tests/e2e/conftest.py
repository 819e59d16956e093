"""What the e2e modules share: the fault-free reference run of the reference job, once per
session and set of job flags (each recovery test compares its final states with it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from flashrecovery.demo import reference_cluster
from flashrecovery.shared.settings import BusSettings, Settings


def job_settings(stack, prefix: str = "e2e") -> Settings:
    """Settings of a new job on the session's broker and Redis, in a topic namespace of its own."""
    job = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return Settings(
        job_id=job,
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        bus=BusSettings(topic_namespace=job, telemetry_partitions=2, linger_ms=2),
    )


@pytest.fixture
def new_job_settings(stack) -> Callable[[str], Settings]:
    """prefix -> job_settings(stack, prefix)."""
    return lambda prefix="e2e": job_settings(stack, prefix)


def _fault_free_states(stack, run_dir: Path, steps: int, worker_args: str) -> dict:
    async def go() -> dict:
        settings = job_settings(stack)
        c = reference_cluster(settings, run_dir / settings.job_id, steps, worker_args)
        try:
            await c.start()
            await c.wait_until(c.finished, 300, "fault-free run to finish")
            assert not c.timeline.incidents, f"false incident: {c.timeline.incidents[0].reason}"
            assert not c.timeline.completed, "a recovery in the fault-free run"
            return c.final_states()
        finally:
            await c.stop()

    return asyncio.run(go())


@pytest.fixture(scope="session")
def fault_free_states(stack, tmp_path_factory) -> Callable[[int, str], dict]:
    """(steps, worker flags) -> the final states of a fault-free run of that job, run once per
    session: a run costs ~40 s on 2 cores, and the test modules use the same job."""
    cache: dict[tuple[int, str], dict] = {}

    def get(steps: int, worker_args: str) -> dict:
        key = (steps, " ".join(worker_args.split()))
        if key not in cache:
            cache[key] = _fault_free_states(stack, tmp_path_factory.mktemp("ref"), *key)
        return cache[key]

    return get
