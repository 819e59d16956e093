"""`flashrecovery up` on the embedded stack: everything becomes ready, Ctrl-C stops all of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gauge(url: str, name: str) -> float:
    """The sum of a series' samples on a /metrics page (0 when absent)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(name + "{") or ln.startswith(name + " ")
    )


def test_up_starts_everything_and_ctrl_c_stops_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHRECOVERY_KAFKA_BOOTSTRAP", "FLASHRECOVERY_REDIS_URL")}
    env.update(FLASHRECOVERY_RUNTIME_DIR=str(tmp_path), FLASHRECOVERY_JOB_ID="uptest")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashrecovery", "up"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 150
        line = ""
        while "ready" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "up exited before it was ready"
        assert "detector, planner, executor-0, executor-1 ready" in line
        # every service serves Prometheus metrics on the port `up` gave it (what `status` shows)
        metrics = json.loads((tmp_path / "jobs" / "uptest.json").read_text())["metrics"]
        assert set(metrics) == {"detector", "planner", "executor-0", "executor-1"}
        deadline = time.monotonic() + 30
        while True:  # the lease is taken within a round of the executors' loop
            leaders = sum(
                _gauge(f"http://{a}/metrics", "flashrecovery_executor_leader")
                for n, a in metrics.items()
                if n.startswith("executor")
            )
            if leaders == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert leaders == 1
        status = subprocess.run(
            [sys.executable, "-m", "flashrecovery", "status", "--listen", "0", "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["metrics"] == metrics
        children = _children(proc.pid)
        assert len(children) >= 6  # broker, redis, detector, planner, 2 executors
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert not [c for c in children if _alive(c)], "something outlived `up`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _instance(pid: int) -> str | None:
    """The FLASHRECOVERY_INSTANCE of an executor process, or None for anything else."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"flashrecovery.executor" not in cmdline:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"FLASHRECOVERY_INSTANCE=")), None)


def test_up_restarts_a_dead_executor_and_keeps_the_rest_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHRECOVERY_KAFKA_BOOTSTRAP", "FLASHRECOVERY_REDIS_URL")}
    env.update(FLASHRECOVERY_RUNTIME_DIR=str(tmp_path), FLASHRECOVERY_JOB_ID="uptest2", FLASHRECOVERY_LOG_FORMAT="json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashrecovery", "up"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 150
        line = ""
        while "ready" not in line or "flashrecovery up" not in line:
            assert time.monotonic() < deadline, "up not ready in time"
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "up exited before it was ready"
        children = _children(proc.pid)
        executors = {_instance(c): c for c in children if _instance(c) is not None}
        assert set(executors) == {"0", "1"}
        os.kill(executors["0"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "up stopped when one executor died"
            again = {_instance(c): c for c in _children(proc.pid) if _instance(c) is not None}
            if again.get("0") not in (None, executors["0"]):
                break
            assert time.monotonic() < deadline, "the dead executor was not restarted"
            time.sleep(0.2)
        assert again["1"] == executors["1"], "the standby executor must keep running"
        assert all(_alive(c) for c in children if c != executors["0"]), "something else stopped"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        restarted = [ln for ln in out.splitlines() if '"service_restarted"' in ln]
        assert restarted and "executor-0" in restarted[0], out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
