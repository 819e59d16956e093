"""Issue #16's secure run end to end: the process-crash recovery of test_recovery_services on a
stack of its own with everything on at once: SASL/SCRAM-SHA-512 over TLS to the broker (the
gateway in front of the embedded one), a Redis ACL user per role limited to the job's keys and
the role's commands (the default user locked with a password), and signed incidents, plans and commands. It must end bitwise equal
to a fault-free run of the same secure set-up with no committed step lost, and nothing may have
been refused on the way (no failed SCRAM exchange, no unauthenticated record, no Redis
permission error)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import redis

from flashrecovery.cluster import LocalCluster, states_equal
from flashrecovery.demo import committed_steps_lost_observed, reference_cluster
from flashrecovery.secure import REDIS_ROLES, SERVICE_PRINCIPALS, WATCHER, SecureRun, start_secure_stack
from flashrecovery.shared.settings import BusSettings, Settings

STEPS = 16
AT = 5
STEP_SLEEP_S = 0.3  # as test_recovery_services: the fault lands before the job ends
pytestmark = pytest.mark.timeout(600)


async def _run(tmp: Path, fault: str | None) -> dict:
    job = f"sec-{uuid.uuid4().hex[:8]}"
    base = Settings(job_id=job, bus=BusSettings(topic_namespace=job, telemetry_partitions=2, linger_ms=2))
    run_dir = (tmp / job).resolve()
    secure = start_secure_stack(run_dir, base)
    stack, settings = secure.stack, secure.settings
    c: LocalCluster | None = None
    try:
        assert settings.bus.security.protocol == "SASL_SSL" and settings.bus.signing_key_file
        assert f"fr-{job}-operator:" in settings.redis_url  # the watcher's ACL user
        _assert_redis_speaks_tls_only(stack.redis_url)
        # 2 nodes x 2 ranks (dp 2 x tp 2) and the spare: every kind of process, half the count
        c = reference_cluster(
            settings,
            run_dir,
            STEPS,
            f"--step-sleep {STEP_SLEEP_S}",
            nodes=2,
            kafka_principals=secure.kafka_principals,
            redis_urls=secure.redis_urls,
        )
        await c.start()
        if fault is None:
            await c.wait_until(c.finished, 300, "fault-free run to finish")
            assert not c.timeline.incidents
            return {"states": c.final_states(), "run_dir": run_dir, "stack": stack, "redis": _redis_view(secure)}
        await c.wait_until(lambda: c.min_step() >= 1, 300, "training to start")
        pids = {r: s.pid for r, (_, s) in c.timeline.rank_view().items()}
        fault_at = await c.inject(fault, 2, AT)
        await c.wait_until(lambda: any(x.outcome == "done" for x in c.timeline.completed), 300, "recovery")
        await c.wait_until(c.finished, 300, "training to finish")
        done = [x for x in c.timeline.completed if x.outcome == "done"]
        return {
            "states": c.final_states(),
            "pids": pids,
            "done": done,
            "restarted": set(next(p for p in c.timeline.plans if p.plan_id == done[-1].plan_id).restart_ranks),
            "lost_observed": committed_steps_lost_observed(c.timeline, fault_at, done[-1].recovery_step),
            "run_dir": run_dir,
            "stack": stack,
            "redis": _redis_view(secure),
        }
    finally:
        if c is not None:
            await c.stop()
        stack.stop()


def _assert_redis_speaks_tls_only(url: str) -> None:
    """Every process reaches Redis over TLS (`rediss://`, verified against the run's CA): the same
    port refuses a plaintext client."""
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    plain = redis.Redis.from_url(url.replace("rediss://", "redis://", 1).split("?")[0], socket_timeout=3)
    try:
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        plain.close()


def _redis_view(secure: SecureRun) -> tuple[set[str], list[dict]]:
    """(the ACL users of the clients connected now, Redis's log of refused commands and keys),
    asked as the default user while the run is still up."""
    admin_password = (secure.files.dir / "redis-admin-password").read_text()
    r = redis.Redis.from_url(secure.stack.redis_url, password=admin_password)
    try:
        users = {c["user"] for c in r.client_list()} - {"default"}
        # redis-py's CLIENT SETINFO at connect (a Redis >= 7.2 refuses it to every role, and
        # redis-py carries on) is no refusal of the registry's
        denials = [d for d in r.acl_log() if _text(d.get("object")) != "client|setinfo"]
        return users, denials
    finally:
        r.close()


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _auth_decisions(run_dir: Path) -> list[dict]:
    out = []
    for log in run_dir.glob("kafka-gateway-*.log"):
        for line in log.read_text().splitlines():
            if line.startswith("{") and (e := json.loads(line)).get("event") == "kafka_auth":
                out.append(e)
    return out


def _assert_nothing_refused(run: dict) -> None:
    run_dir = run["run_dir"]
    users, denials = run["redis"]
    # each service connected as its own role's Redis user (the watcher's is the operator, not
    # necessarily connected at the end), and Redis refused nothing to any of them
    job = run_dir.name
    assert {f"fr-{job}-{r}" for r in REDIS_ROLES} <= users <= {f"fr-{job}-{r}" for r in (*REDIS_ROLES, "operator")}
    assert denials == []
    decisions = _auth_decisions(run_dir)
    # every kind of process authenticated through the gateway as its own principal
    assert {e["principal"] for e in decisions if e["outcome"] == "ok"} == {*SERVICE_PRINCIPALS, WATCHER}
    assert [e for e in decisions if e["outcome"] != "ok"] == []
    logs = "".join(p.read_text(errors="replace") for p in run_dir.rglob("*.log") if "gateway" not in p.name)
    for word in ("unauthenticated", "NOPERM", "NOAUTH", "WRONGPASS", "SaslAuthenticationFailed"):
        assert word not in logs, word


def test_crash_recovers_bitwise_with_sasl_tls_acl_and_signing(tmp_path):
    reference = asyncio.run(_run(tmp_path / "ref", None))
    _assert_nothing_refused(reference)
    result = asyncio.run(_run(tmp_path / "fault", "process-crash"))
    ok, why = states_equal(reference["states"], result["states"])
    assert ok, why
    assert result["restarted"] == {2}
    assert all(d.committed_steps_lost == 0 for d in result["done"])
    assert result["lost_observed"] == 0
    for r, pid in result["pids"].items():
        if r not in result["restarted"]:
            assert result["states"][r]["pid"] == pid, f"survivor rank {r} changed process"
    _assert_nothing_refused(result)
