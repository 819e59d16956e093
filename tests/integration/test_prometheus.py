"""A real Prometheus server scrapes a running stack through one real recovery: 2 nodes x 1 rank
of the reference job plus a spare node with a standby, the detector, the planner and two
executors each serving /metrics on a free loopback port. A process crash is injected, and the
incident and RTO series are then read back over Prometheus's HTTP API, as a dashboard would.

Needs the `prometheus` binary (Debian package `prometheus`, installed by `make os-deps`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from flashrecovery.demo import reference_cluster
from flashrecovery.shared import metrics as M
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.stack import free_port, wait_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.timeout(600)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary: `make os-deps` installs the Debian package `prometheus`"
)
SCRAPE_S = 0.5


def _config(targets: dict[str, str]) -> str:
    """One scrape job per process, labelled like the Kubernetes deployment's (service=...)."""
    jobs = [
        {
            "job_name": name,
            "scrape_interval": f"{int(SCRAPE_S * 1000)}ms",
            "scrape_timeout": "400ms",
            "static_configs": [{"targets": [addr], "labels": {"service": name.split("-")[0]}}],
        }
        for name, addr in sorted(targets.items())
    ]
    return json.dumps({"global": {"scrape_interval": f"{int(SCRAPE_S * 1000)}ms"}, "scrape_configs": jobs})


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(port: int, promql: str) -> float | None:
    result = _query(port, promql)
    return float(result[0]["value"][1]) if result else None


def _wait_value(port: int, promql: str, ok, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        v = _value(port, promql)
        if v is not None and ok(v):
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(SCRAPE_S)


def _start_prometheus(tmp: Path, targets: dict[str, str]) -> tuple[subprocess.Popen, int]:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "prometheus.yml"
    cfg.write_text(_config(targets))  # JSON is YAML
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(port, 60, proc)
        _wait_ready(port, proc, 90)  # the port opens before the storage is up: the API answers 503
    except BaseException:
        _stop(proc)
        raise
    return proc, port


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:  # URLError / HTTPError 503 while starting
            pass
        assert proc.poll() is None, "prometheus exited while starting (see prometheus.log)"
        assert time.monotonic() < deadline, f"prometheus not ready after {timeout_s}s"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_metrics_endpoint_serves_the_series_and_refuses_a_busy_port():
    port = free_port()
    server = M.serve(port)
    try:
        M.DEAD_LETTERS.labels("test-consumer", M.reason_class("unknown kind 'x'")).inc()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'flashrecovery_dead_letters_total{consumer="test-consumer",reason="unknown_kind"} 1.0' in text
        assert "# TYPE flashrecovery_recovery_rto_seconds histogram" in text
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port}"):
            M.serve(port)
    finally:
        server.shutdown()
        server.server_close()
    assert M.serve(0) is None  # 0: no endpoint


@needs_prometheus
def test_prometheus_scrapes_incident_and_rto_of_a_recovery(stack, tmp_path):
    job = f"prom-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        job_id=job,
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        runtime_dir=str(tmp_path / "runtime"),
        bus=BusSettings(topic_namespace=job, telemetry_partitions=2, linger_ms=2),
    )
    # The slept steps give the crash time to land mid-run on a loaded 2-core box; one rank per
    # node (tp=1, dp=2), so the replaced rank copies its state from the other node's replica.
    cluster = reference_cluster(
        settings,
        tmp_path / job,
        40,
        "--step-sleep 0.25",
        tp=1,
        nodes=2,
        ranks_per_node=1,
        spares=1,
        standbys=1,
        metrics=True,
    )

    async def run() -> None:
        prom = None
        try:
            await cluster.start(timeout_s=240)
            targets = {n: f"127.0.0.1:{p}" for n, p in cluster.sup.metrics_ports.items()}
            assert {"detector", "planner", "executor-0", "executor-1", "sidecar-node-0", "sidecar-spare-0"} <= set(
                targets
            ), targets
            address = json.loads(cluster.address_file().read_text())
            assert address["metrics"] == targets  # what `flashrecovery status` shows
            prom, port = _start_prometheus(tmp_path / "prom", targets)
            every = await asyncio.to_thread(_wait_value, port, "count(up == 1)", lambda v: v == len(targets), 90)
            assert every == len(targets), _query(port, "up")
            await cluster.wait_until(lambda: cluster.min_step() >= 2, 300, "training to start")
            await cluster.inject("process-crash", 1, 3)
            await cluster.wait_until(
                lambda: any(c.outcome == "done" for c in cluster.timeline.completed), 300, "the recovery to finish"
            )

            incidents = await asyncio.to_thread(
                _wait_value,
                port,
                'sum(flashrecovery_incidents_total{fault_class="process_crash"})',
                lambda v: v >= 1,
                60,
            )
            assert incidents == 1, _query(port, "flashrecovery_incidents_total")
            assert _value(port, 'sum(flashrecovery_incidents_total{fault_class!="process_crash"})') in (None, 0.0)
            rto_count = await asyncio.to_thread(
                _wait_value,
                port,
                'sum(flashrecovery_recovery_rto_seconds_count{fault_class="process_crash"})',
                lambda v: v >= 1,
                60,
            )
            assert rto_count is not None and rto_count >= 1
            done = next(c for c in cluster.timeline.completed if c.outcome == "done")
            rto_sum = _value(port, "sum(flashrecovery_recovery_rto_seconds_sum)")
            assert rto_sum == pytest.approx(done.rto_s, abs=1e-3)  # the RecoveryCompleted's own figure
            assert _value(port, 'sum(flashrecovery_recoveries_total{outcome="done"})') >= 1
            assert _value(port, "sum(flashrecovery_executor_leader)") == 1  # one lease holder
            assert _value(port, "sum(flashrecovery_detection_latency_seconds_count)") == 1
            assert _value(port, 'count(flashrecovery_recovery_phase_seconds_count{phase="rebuild"})') >= 1
            assert _value(port, "sum(flashrecovery_heartbeats_received_total)") > 0
            assert _value(port, 'sum(flashrecovery_messages_consumed_total{topic="flashrecovery.incidents.v1"})') >= 1
        finally:
            if prom is not None:
                _stop(prom)
            await cluster.stop()

    asyncio.run(run())
