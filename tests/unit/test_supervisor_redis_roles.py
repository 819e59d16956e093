"""The supervisor gives each child its kind's Redis URL (a secure run's ACL user per role,
flashrecovery.secure): a restart keeps it, a child of no role gets the address without the
supervisor's own credentials, and without role URLs every child gets the supervisor's."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from flashrecovery import supervisor as supmod
from flashrecovery.shared.settings import Settings

OPERATOR = "redis://fr-j-operator:op-pw@127.0.0.1:2/0"
ROLES = {r: f"redis://fr-j-{r}:{r}-pw@127.0.0.1:2/0" for r in ("detector", "planner", "executor", "sidecar")}


class FakePopen:
    def __init__(self, argv, env, **_):
        self.argv, self.env, self.pid = argv, env, 4242
        self.code = None

    def poll(self):
        return self.code


def _sup(tmp_path, monkeypatch, redis_urls) -> supmod.Supervisor:
    monkeypatch.setattr(supmod.subprocess, "Popen", FakePopen)
    sup = supmod.Supervisor(Settings(job_id="j"), tmp_path, redis_urls=redis_urls)
    sup.stack = SimpleNamespace(kafka_bootstrap="127.0.0.1:1", redis_url=OPERATOR)
    return sup


def _start_all(sup: supmod.Supervisor) -> dict[str, str]:
    sup.start_service("detector")
    sup.start_service("planner")
    sup.start_service("executor", "executor-1", FLASHRECOVERY_INSTANCE="1")
    sup.spawn("sidecar-node-0", [sys.executable, "-m", "flashrecovery.sidecar"])
    sup.spawn("rdzv", [sys.executable, "-m", "flashrecovery.shared.rendezvous", "--port", "1"])
    return {n: p.env["FLASHRECOVERY_REDIS_URL"] for n, p in sup.procs.items()}


def test_each_child_gets_its_roles_redis_user(tmp_path, monkeypatch):
    sup = _sup(tmp_path, monkeypatch, ROLES)
    assert _start_all(sup) == {
        "detector": ROLES["detector"],
        "planner": ROLES["planner"],
        "executor-1": ROLES["executor"],
        "sidecar-node-0": ROLES["sidecar"],
        "rdzv": "redis://127.0.0.1:2/0",  # no role: no credentials, not the operator's
    }
    sup.procs["sidecar-node-0"].code = 1
    assert sup.revive(max_restarts=1) == [("sidecar-node-0", 1, True)]
    assert sup.procs["sidecar-node-0"].env["FLASHRECOVERY_REDIS_URL"] == ROLES["sidecar"]


def test_without_role_urls_every_child_gets_the_supervisors(tmp_path, monkeypatch):
    sup = _sup(tmp_path, monkeypatch, {})
    assert set(_start_all(sup).values()) == {OPERATOR}


def test_without_credentials():
    assert supmod.without_credentials(OPERATOR) == "redis://127.0.0.1:2/0"
    assert supmod.without_credentials("rediss://:pw@h:6380/1?x=1") == "rediss://h:6380/1?x=1"
    assert supmod.without_credentials("redis://h:1/0") == "redis://h:1/0"
