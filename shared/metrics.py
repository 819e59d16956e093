"""Prometheus metrics: every series the services and the sidecar export, defined here once.

Only the I/O shells record them (the pure cores decide, the shells count what was decided).
Each process serves its own default registry over HTTP on `settings.metrics_port` (0: off, the
default; `flashrecovery up` and the local cluster pick free ports). Names follow Prometheus
conventions: counters end in `_total`, durations are `_seconds`. Labels are bounded: fault
classes, outcomes, phases, topic names without the test namespace, dead-letter reason classes.
The series and the alerts built on them: deploy/prometheus/alerts.yml, deploy/grafana/."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Latencies of a few hundred ms on a quiet box up to the phase timeout (60 s) and beyond.
_FAST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RTO = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# ---------------------------------------------------------------- detector
INCIDENTS = Counter(
    "flashrecovery_incidents_total", "Incidents the detector published (one per root cause)", ["fault_class", "action"]
)
DEGRADATIONS = Counter(
    "flashrecovery_degradations_total",
    "Degradations the detector published (e.g. stragglers: no recovery)",
    ["fault_class"],
)
DETECTION_LATENCY = Histogram(
    "flashrecovery_detection_latency_seconds",
    "First symptom received to incident published",
    ["fault_class"],
    buckets=_FAST,
)
HEARTBEATS_RECEIVED = Counter(
    "flashrecovery_heartbeats_received_total", "Node heartbeats the detector ingested (its ingest rate)"
)

# ---------------------------------------------------------------- planner
PLANNER_DECISIONS = Counter(
    "flashrecovery_planner_decisions_total", "What the planner decided per incident", ["outcome"]
)
ESCALATIONS = Counter(
    "flashrecovery_escalations_total", "Escalations published: an incident left to an operator", ["service"]
)
STANDBY_POOL = Gauge(
    "flashrecovery_standby_pool_size", "Free standby slots on spare nodes, as the planner last read the registry"
)
NODES = Gauge("flashrecovery_nodes", "The job's nodes by role, as the planner last read the registry", ["role"])

# ---------------------------------------------------------------- executor
EXECUTOR_LEADER = Gauge(
    "flashrecovery_executor_leader", "1 while this executor instance holds the lease, else 0", ["instance"]
)
RECOVERIES = Counter(
    "flashrecovery_recoveries_total",
    "Recovery plans the executor finished, by outcome (done, failed, superseded, ...)",
    ["outcome", "fault_class"],
)
RTO = Histogram(
    "flashrecovery_recovery_rto_seconds",
    "Fault (first symptom) to every rank committed the first step after recovery",
    ["fault_class"],
    buckets=_RTO,
)
PHASE_SECONDS = Histogram(
    "flashrecovery_recovery_phase_seconds",
    "Duration of each recovery phase (fence, pause, replace, rebuild, ...)",
    ["phase"],
    buckets=_FAST,
)
RESUME_STEP = Gauge(
    "flashrecovery_recovery_resume_step",
    "The step the last recovery resumed the job at (every rank had committed the one before)",
)

# ---------------------------------------------------------------- sidecar
HEARTBEATS_SENT = Counter(
    "flashrecovery_sidecar_heartbeats_sent_total", "Heartbeats this sidecar published", ["node_id"]
)
COMMITTED_STEP = Gauge(
    "flashrecovery_committed_step",
    "The highest step every rank of this node has applied (min over its ranks)",
    ["node_id"],
)
STANDBYS_READY = Gauge(
    "flashrecovery_sidecar_standbys_ready", "Pre-started standby workers of this node connected and ready", ["node_id"]
)

# ---------------------------------------------------------------- bus (every consumer)
CONSUMED = Counter("flashrecovery_messages_consumed_total", "Records consumed", ["consumer", "topic"])
CONSUMER_LAG = Gauge(
    "flashrecovery_consumer_lag_messages",
    "Records behind the partition's high watermark after the last batch",
    ["consumer", "topic", "partition"],
)
DEAD_LETTERS = Counter(
    "flashrecovery_dead_letters_total", "Records dead-lettered, by reason class", ["consumer", "reason"]
)

# The first words of the reasons bus / detector / schemas give, in the order they are tested.
_REASONS = (
    ("empty message", "empty"),
    ("not JSON", "not_json"),
    ("expected a JSON object", "not_object"),
    ("unknown kind", "unknown_kind"),
    ("invalid", "invalid"),
    ("undecodable", "undecodable"),
    ("handler failed", "handler_failed"),
    ("detector failed", "handler_failed"),
    ("untrusted", "untrusted"),
    ("unauthenticated", "unauthenticated"),
)


def reason_class(reason: str) -> str:
    """A dead letter's free-text reason -> a bounded label value ('other' when unknown)."""
    return next((label for prefix, label in _REASONS if reason.startswith(prefix)), "other")


def label(value: Any) -> str:
    """An enum, None or str as a label value ('' for None)."""
    return "" if value is None else str(getattr(value, "value", value))


def serve(port: int, host: str = "127.0.0.1") -> Any:
    """Expose this process's metrics on host:port (0: off, returns None). A port in use is a
    start-up error that names it, not a service running unobserved."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise SystemExit(f"metrics: cannot listen on {host}:{port}: {exc}") from None
    return server
