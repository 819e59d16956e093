"""Redis ACL users per job (issue #16 item 3, JobKeys.acl_rules) on the real redis-server: a
service's user can run everything the registry does for its job and cannot read or write
another job's keys, nor run admin commands."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError

from flashrecovery.shared.keys import JobKeys
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.topology import grid_topology

pytestmark = pytest.mark.timeout(60)


def _url_for(base: str, user: str, password: str) -> str:
    u = urlsplit(base)
    return f"{u.scheme}://{user}:{password}@{u.hostname}:{u.port}{u.path}"


async def test_a_jobs_redis_user_reaches_its_keys_only(settings):
    admin = aioredis.Redis.from_url(settings.redis_url)
    tag = uuid.uuid4().hex[:8]
    jobs = {f"acl-a-{tag}": f"fr-a-{tag}", f"acl-b-{tag}": f"fr-b-{tag}"}
    try:
        for job, user in jobs.items():
            await admin.execute_command("ACL", "SETUSER", user, "on", f">pw-{user}", *JobKeys(job).acl_rules("job"))
        (job_a, user_a), (job_b, user_b) = jobs.items()
        url_a = _url_for(settings.redis_url, user_a, f"pw-{user_a}")

        own = Registry.from_url(url_a, job_a)
        try:
            # what the services do: topology, scripted generation moves, leases, scans, runs
            await own.init_job(grid_topology(job_a, nodes=2, ranks_per_node=2, tp=2))
            assert (await own.snapshot()).world_size == 4
            assert await own.bump_generation(0) == 1
            assert await own.acquire_lease("executor", "e0", 3.0) is not None
            await own.heartbeat_liveness("detector", "0")
            assert await own.live_services() == ["detector:0"]
            await own.record_node_faults(["node-0"], "inc-1", 100.0, 3600.0)
            assert await own.node_fault_history(["node-0"], 0.0) == {"node-0": {"inc-1": 100.0}}
        finally:
            await own.close()

        other = Registry.from_url(url_a, job_b)  # job A's credentials, job B's keys
        try:
            with pytest.raises(NoPermissionError):
                await other.init_job(grid_topology(job_b, nodes=2, ranks_per_node=2, tp=2))
            with pytest.raises(NoPermissionError):
                await other.generation()
        finally:
            await other.close()

        raw = aioredis.Redis.from_url(url_a)
        try:
            with pytest.raises(NoPermissionError):
                await raw.flushall()
            with pytest.raises(NoPermissionError):
                await raw.keys("*")
        finally:
            await raw.aclose()

        wrong = aioredis.Redis.from_url(_url_for(settings.redis_url, user_a, "not-the-password"))
        try:
            with pytest.raises(AuthenticationError):
                await wrong.ping()
        finally:
            await wrong.aclose()
    finally:
        for job, user in jobs.items():
            await admin.execute_command("ACL", "DELUSER", user)
            keys = [k async for k in admin.scan_iter(match=f"fr:{{{job}}}:*")]
            if keys:
                await admin.delete(*keys)
        await admin.aclose()
