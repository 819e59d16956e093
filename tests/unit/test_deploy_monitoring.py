"""The monitoring files in deploy/ against the series shared/metrics.py defines: every PromQL
expression of the dashboard and the alert rules names only series that exist, the alert rules
pass `promtool check rules` and their unit tests (`promtool test rules`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from flashrecovery.shared import metrics as M

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "flashrecovery.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool: `make os-deps` installs the Debian package `prometheus`"
)


def _defined() -> dict[str, str]:
    """Every metric of shared/metrics.py: exposed sample name -> type."""
    out = {}
    for obj in vars(M).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                if family.type == "counter":
                    out[family.name + "_total"] = "counter"
                elif family.type == "histogram":
                    out.update({family.name + s: "histogram" for s in ("_bucket", "_sum", "_count")})
                else:
                    out[family.name] = family.type
    return out


def _exprs_dashboard() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _exprs_alerts() -> list[str]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_metric_names_follow_prometheus_conventions():
    defined = _defined()
    assert len(defined) > 20
    for name, kind in defined.items():
        assert name.startswith("flashrecovery_"), name
        assert re.fullmatch(r"[a-z_]+", name), name
        if kind == "histogram":
            assert re.search(r"_seconds_(bucket|sum|count)$", name), f"{name}: a histogram of seconds"
    for required in (
        "flashrecovery_incidents_total",
        "flashrecovery_recovery_rto_seconds_count",
        "flashrecovery_detection_latency_seconds_bucket",
        "flashrecovery_recovery_phase_seconds_sum",
        "flashrecovery_consumer_lag_messages",
        "flashrecovery_dead_letters_total",
        "flashrecovery_heartbeats_received_total",
        "flashrecovery_executor_leader",
        "flashrecovery_standby_pool_size",
        "flashrecovery_committed_step",
    ):
        assert required in defined, required


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_names_defined_series(source):
    exprs = _exprs_dashboard() if source == "dashboard" else _exprs_alerts()
    defined = _defined()
    used = {n for e in exprs for n in re.findall(r"\bflashrecovery_[a-z_]+", e)}
    assert used, "no flashrecovery series used at all"
    assert not used - defined.keys(), f"{source} uses undefined series: {sorted(used - defined.keys())}"
    # counters are only read through rate()/increase(): a raw counter value means nothing
    for e in exprs:
        for name in re.findall(r"\bflashrecovery_[a-z_]+_total\b", e):
            assert re.search(rf"(rate|increase)\({name}\b", e), f"raw counter {name} in {e!r}"


def test_alerts_cover_the_operational_failures():
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == {
        "FlashRecoveryIncidentStorm",
        "FlashRecoveryRecoveryEscalated",
        "FlashRecoveryRTOHigh",
        "FlashRecoveryDetectorDown",
        "FlashRecoveryPlannerDown",
        "FlashRecoveryExecutorDown",
        "FlashRecoveryExecutorNoLeader",
        "FlashRecoveryDeadLettersRising",
        "FlashRecoveryStandbyPoolEmpty",
        "FlashRecoveryConsumerLag",
    }
    runbook = (ROOT / "docs" / "runbook.md").read_text().lower()
    for g in rules["groups"]:
        for r in g["rules"]:
            anchor = r["annotations"]["runbook"].split("#", 1)[1]
            assert f"### {anchor}" in runbook, f"docs/runbook.md has no section for {r['alert']}"


def test_dashboard_is_importable_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "flashrecovery" and dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


@pytest.mark.parametrize(
    "reason, label",
    [
        ("empty message (tombstone)", "empty"),
        ("not JSON: bad", "not_json"),
        ("expected a JSON object, got list", "not_object"),
        ("unknown kind 'x'", "unknown_kind"),
        ("invalid heartbeat: seq: field required", "invalid"),
        ("undecodable: ValueError()", "undecodable"),
        ("handler failed 4x: KeyError()", "handler_failed"),
        ("detector failed: E()", "handler_failed"),
        ("untrusted: rank 9 outside the world", "untrusted"),
        ("unauthenticated: no tag", "unauthenticated"),
        ("something new", "other"),
    ],
)
def test_dead_letter_reasons_map_to_bounded_labels(reason, label):
    assert M.reason_class(reason) == label


@needs_promtool
def test_promtool_checks_and_unit_tests_the_alert_rules():
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=PROM_DIR, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout
    unit = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=PROM_DIR, capture_output=True, text=True, timeout=60
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_scrape_config_matches_the_manifests_labels():
    """deploy/prometheus/scrape.yml keeps pods by a label and names the `service` label from the
    component label: every pod with a metrics port carries the first, and every component maps
    to a service the alert rules know."""
    cfg = yaml.safe_load((PROM_DIR / "scrape.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    relabel = cfg["scrape_configs"][0]["relabel_configs"]
    keep = relabel[0]
    assert keep["action"] == "keep"
    label = keep["source_labels"][0].removeprefix("__meta_kubernetes_pod_label_")
    to_service = [r for r in relabel if r.get("target_label") == "service"]
    components = set()
    for path in (ROOT / "deploy" / "k8s" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = (doc or {}).get("spec", {}).get("template", {})
            ports = [p.get("name") for c in pod.get("spec", {}).get("containers", []) for p in c.get("ports", [])]
            if "metrics" in ports:
                labels = pod["metadata"]["labels"]
                match = {re.sub(r"[^a-z0-9]", "_", k): v for k, v in labels.items()}
                assert re.fullmatch(keep["regex"], match.get(label, "")), f"{path.name}: not scraped"
                components.add(labels["app.kubernetes.io/component"])
    assert components == {"detector", "planner", "executor", "trainer", "spare"}
    for comp in components:
        hits = [r for r in to_service if re.fullmatch(r["regex"], comp)]
        assert hits, f"component {comp} gets no service label"
        service = re.sub(r"^" + hits[0]["regex"] + r"$", hits[0].get("replacement", r"\1").replace("$1", r"\1"), comp)
        assert service in {"detector", "planner", "executor", "sidecar"}, (comp, service)
