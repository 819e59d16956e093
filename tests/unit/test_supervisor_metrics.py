"""The supervisor's metrics ports: each service and sidecar process gets its own, a restart
keeps it, the address file lists them, and a port set for the supervisor itself is never
inherited by its children (they would all try to bind it)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from flashrecovery import supervisor as supmod
from flashrecovery.shared.settings import Settings


class FakePopen:
    def __init__(self, argv, env, **_):
        self.argv, self.env, self.pid = argv, env, 4242
        self.code = None

    def poll(self):
        return self.code


def _sup(tmp_path, monkeypatch, metrics: bool) -> supmod.Supervisor:
    monkeypatch.setattr(supmod.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("FLASHRECOVERY_METRICS_PORT", "9400")
    sup = supmod.Supervisor(Settings(job_id="j"), tmp_path, metrics=metrics)
    sup.stack = SimpleNamespace(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:2")
    return sup


def test_each_service_and_sidecar_gets_its_own_port(tmp_path, monkeypatch):
    sup = _sup(tmp_path, monkeypatch, metrics=True)
    sup.start_service("detector")
    sup.start_service("executor", "executor-0", FLASHRECOVERY_INSTANCE="0")
    sup.spawn("sidecar-node-0", [sys.executable, "-m", "flashrecovery.sidecar"])
    sup.spawn("rdzv", [sys.executable, "-m", "flashrecovery.shared.rendezvous", "--port", "1"])
    ports = {n: p.env.get("FLASHRECOVERY_METRICS_PORT") for n, p in sup.procs.items()}
    assert ports["rdzv"] is None  # not a metrics process, and 9400 is not inherited
    served = {n: int(p) for n, p in ports.items() if p is not None}
    assert set(served) == {"detector", "executor-0", "sidecar-node-0"}
    assert len(set(served.values())) == 3 and 9400 not in served.values()
    assert sup.metrics_ports == served
    sup.procs["executor-0"].code = 1
    assert sup.revive(max_restarts=1) == [("executor-0", 1, True)]
    assert sup.procs["executor-0"].env["FLASHRECOVERY_METRICS_PORT"] == str(served["executor-0"])
    path = tmp_path / "jobs" / "j.json"
    supmod.write_job_address(path, sup.settings, sup, tmp_path)
    assert json.loads(path.read_text())["metrics"] == {n: f"127.0.0.1:{p}" for n, p in served.items()}


def test_metrics_off_leaves_children_without_a_port(tmp_path, monkeypatch):
    sup = _sup(tmp_path, monkeypatch, metrics=False)
    sup.start_service("planner")
    assert "FLASHRECOVERY_METRICS_PORT" not in sup.procs["planner"].env
    assert sup.metrics_ports == {}
