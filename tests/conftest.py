"""Session fixtures: a real broker and a real Redis on free loopback ports, started here unless
FLASHRECOVERY_TEST_KAFKA / FLASHRECOVERY_TEST_REDIS name ones to reuse. Each test gets its own
topic namespace and job id, so tests never see each other's messages or keys."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from flashrecovery.shared import bus as busmod
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.stack import Stack, free_port, start_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    s = start_stack(
        tmp_path_factory.mktemp("stack"),
        kafka_bootstrap=os.environ.get("FLASHRECOVERY_TEST_KAFKA"),
        redis_url=os.environ.get("FLASHRECOVERY_TEST_REDIS"),
    )
    yield s
    s.stop()


@pytest.fixture
def gloo_pair() -> Callable[..., Any]:
    """``gloo_pair(target)`` runs ``target(rank, port, out)`` for ranks 0 and 1 in two spawned
    processes and returns the first thing either puts in ``out``; both are killed after it."""

    def run(target: Callable[[int, int, Any], None], timeout_s: float = 75.0) -> Any:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, port, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        try:
            return out.get(timeout=timeout_s)
        finally:
            for p in procs:
                p.kill()
                p.join(5)

    return run


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def job_id(namespace: str) -> str:
    return f"job-{namespace}"


@pytest.fixture
def settings(stack: Stack, namespace: str, job_id: str) -> Settings:
    return Settings(
        job_id=job_id,
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        bus=BusSettings(topic_namespace=namespace, telemetry_partitions=4, control_partitions=1, linger_ms=0),
    )


@pytest_asyncio.fixture
async def topics_ready(settings: Settings) -> Settings:
    await busmod.ensure_topics(settings.kafka_bootstrap, settings.bus)
    return settings


@pytest_asyncio.fixture
async def producer(topics_ready: Settings):
    p = busmod.Producer(topics_ready.kafka_bootstrap, topics_ready.bus)
    await p.start()
    yield p
    await p.stop()


@pytest_asyncio.fixture
async def registry(settings: Settings):
    reg = Registry.from_url(settings.redis_url, settings.job_id)
    yield reg
    await reg.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The folder names the tier, so `pytest -m unit` works without decorating every test.
    for item in items:
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in str(Path(item.fspath)):
                item.add_marker(getattr(pytest.mark, tier))
