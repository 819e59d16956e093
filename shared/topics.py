"""Topic names and partition keys, defined here only.

A topic name ends in the schema major version (`.v1`): a breaking change publishes on a new
topic beside the old one so existing subscribers keep working.

Partition keys: everything a sidecar emits is keyed by node id, so one node's heartbeats, exits
and log lines stay in order and detector instances split the nodes between them by partition.
Control-plane topics (incidents, plans, commands, acks, recovery) are keyed by job id: their
volume is tiny and per-job order matters more than spread.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class Topic:
    name: str
    key_field: str  # the event field whose value is the partition key
    partitions_setting: str  # which BusSettings field gives its partition count


PREFIX = "flashrecovery"

HEARTBEATS = Topic(f"{PREFIX}.heartbeats.v1", "node_id", "telemetry_partitions")
WORKER_EVENTS = Topic(f"{PREFIX}.worker-events.v1", "node_id", "telemetry_partitions")
INCIDENTS = Topic(f"{PREFIX}.incidents.v1", "job_id", "control_partitions")
PLANS = Topic(f"{PREFIX}.plans.v1", "job_id", "control_partitions")
COMMANDS = Topic(f"{PREFIX}.commands.v1", "job_id", "control_partitions")
ACKS = Topic(f"{PREFIX}.acks.v1", "job_id", "control_partitions")
RECOVERY = Topic(f"{PREFIX}.recovery.v1", "job_id", "control_partitions")
DEAD_LETTER = Topic(f"{PREFIX}.deadletter.v1", "topic", "control_partitions")

ALL = (HEARTBEATS, WORKER_EVENTS, INCIDENTS, PLANS, COMMANDS, ACKS, RECOVERY, DEAD_LETTER)
# Records that make something happen carry an authentication tag when a key file is configured
# (shared/signing.py): a command makes sidecars kill processes and move training state, a plan
# makes the executor drive, an incident makes the planner plan, a worker event or a heartbeat
# (or its absence) makes the detector raise one, an ack moves a recovery's phase. Dead letters
# are copies of refused input, never acted on.
SIGNED = tuple(t for t in ALL if t is not DEAD_LETTER)

# Which topic each event kind travels on.
TOPIC_OF_KIND = {
    "node_heartbeat": HEARTBEATS,
    "worker_exit": WORKER_EVENTS,
    "log_event": WORKER_EVENTS,
    "fault_incident": INCIDENTS,
    "degradation": INCIDENTS,
    "recovery_plan": PLANS,
    "escalation": RECOVERY,
    "executor_command": COMMANDS,
    "command_ack": ACKS,
    "recovery_progress": RECOVERY,
    "recovery_completed": RECOVERY,
}


def topic_for(event: BaseModel) -> Topic:
    kind: str = getattr(event, "kind")  # noqa: B009 - every event model has one; BaseModel does not declare it
    return TOPIC_OF_KIND[kind]


def key_for(event: BaseModel) -> bytes:
    topic = topic_for(event)
    return str(getattr(event, topic.key_field)).encode()


def with_namespace(name: str, namespace: str) -> str:
    """Tests and side-by-side jobs on one broker get their own topics."""
    return f"{namespace}.{name}" if namespace else name
