"""Hostile records for every topic of a job's bus (issue #16 item 5): what a broken or malicious
producer could put there. Pure and seeded (random.Random): the same seed gives the same
records, so a failing run can be replayed. Used by the hostile run
(`python -m flashrecovery.bench.hostile_run`) and its test; the per-consumer hypothesis suite
(tests/unit/test_fuzz_consumers.py) explores the same ground record by record.

Every record says what a consumer must do with it (`expect`), so a run can account for each one:

- MALFORMED: not an event (random bytes, a valid one cut short, JSON that is not an object,
  an unknown kind or schema version, a field out of range, an oversized one): every consumer
  that dead-letters the topic dead-letters it.
- UNTRUSTED: a valid telemetry event the detector's admission check refuses (an unknown node
  or rank, a generation ahead of the registry's, another job's): dead-lettered "untrusted".
- REFUSED: a valid control-plane event for this job with a value its consumer refuses (a plan
  the planner never recorded, a command for ranks 10^9 or generation 10^9, an incident for
  nodes that do not exist): refused with a log line or an escalation, never acted on.
- OTHER_JOB: a valid control-plane event of another job: ignored by job id (topics may be
  shared by jobs; a consumer reads past the others' records without a word).
- NO_CONSUMER: the recovery topic: only onlookers (operators' tools) read it.
- UNAUTHENTICATED (signing on): a well-formed event for this job's real nodes, untagged, tagged
  with a key the job does not have, or with the tag of another topic: dead-lettered
  "unauthenticated" by every consumer of the topic.

Never generated: a plausible well-formed event for the job's real nodes without a signature.
Without signing such a record is trusted by design (what signing exists to stop), so it would
test nothing but the design; with signing it is the UNAUTHENTICATED category.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from .shared import topics as T
from .shared.schemas import (
    CommandAck,
    CommandAction,
    ExecutorCommand,
    FaultClass,
    FaultIncident,
    LogEvent,
    NodeHeartbeat,
    PhaseStatus,
    RankState,
    RankStatus,
    RecoveryCompleted,
    RecoveryPlan,
    RecoveryProgress,
    RepairAction,
    Replacement,
    Transfer,
    WorkerExit,
)
from .shared.signing import HEADER_KID, HEADER_TAG, Keyring

MALFORMED = "malformed"
UNTRUSTED = "untrusted"
REFUSED = "refused"
OTHER_JOB = "other_job"
NO_CONSUMER = "no_consumer"
UNAUTHENTICATED = "unauthenticated"

# The topics a job's consumers read, in the order records are dealt out (dead letters are
# never a target: nobody acts on them).
TARGETS = (T.HEARTBEATS, T.WORKER_EVENTS, T.INCIDENTS, T.PLANS, T.COMMANDS, T.ACKS, T.RECOVERY)
OVERSIZED_BYTES = (1 << 20) + 4096  # past the 1 MiB a consumer's dead letter keeps a prefix of
OTHER_JOB_ID = "someone-elses-job"


@dataclass(frozen=True)
class Hostile:
    topic: T.Topic
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    category: str  # how it was made (random_bytes, truncated, absurd:rank, ...)
    expect: str  # what a consumer must do with it (MALFORMED, UNTRUSTED, ...)


@dataclass(frozen=True)
class Job:
    """What the generator knows of the target job: its id, nodes and world size (the absurd
    values are absurd relative to these)."""

    job_id: str
    nodes: tuple[str, ...]
    world_size: int
    ranks_per_node: int = 2


# ------------------------------------------------------------------ a valid event per topic
def _beat(job: str, node: str, ranks: tuple[int, ...], seq: int, generation: int = 0) -> NodeHeartbeat:
    return NodeHeartbeat(
        job_id=job,
        generation=generation,
        producer="hostile",
        node_id=node,
        seq=seq,
        ranks=tuple(
            RankStatus(
                rank=r,
                local_rank=i,
                pid=100 + i,
                state=RankState.RUNNING,
                step=seq,
                step_time_s=0.1,
                since_progress_s=0.1,
            )
            for i, r in enumerate(ranks)
        ),
    )


def _node_ranks(job: Job, i: int) -> tuple[str, tuple[int, ...]]:
    node = job.nodes[i % len(job.nodes)]
    base = (i % len(job.nodes)) * job.ranks_per_node
    return node, tuple(range(base, base + job.ranks_per_node))


def _incident(job_id: str, rng: random.Random, **update: Any) -> FaultIncident:
    inc = FaultIncident(
        job_id=job_id,
        generation=0,
        producer="hostile",
        incident_id=f"hostile-inc-{rng.getrandbits(48):x}",
        fault_class=FaultClass.PROCESS_CRASH,
        action=RepairAction.RESTART_PROCESS,
        root_cause_nodes=("ghost-node",),
        first_seen_at=10.0,
        detected_at=10.2,
    )
    return inc.model_copy(update=update)


def _plan(job: Job, rng: random.Random, **update: Any) -> RecoveryPlan:
    n0, (r0, r1) = job.nodes[1 % len(job.nodes)], (2, 3)
    plan = RecoveryPlan(
        job_id=job.job_id,
        generation=0,
        producer="hostile",
        plan_id=f"hostile-plan-{rng.getrandbits(48):x}",
        incident_ids=(f"hostile-inc-{rng.getrandbits(48):x}",),
        target_generation=1,
        world_size=job.world_size,
        restart_ranks=(r0, r1),
        faulty_nodes=(n0,),
        replacements=(
            Replacement(rank=r0, from_node=n0, to_node="spare-0", local_rank=0),
            Replacement(rank=r1, from_node=n0, to_node="spare-0", local_rank=1),
        ),
        transfers=(Transfer(src=0, dst=r0), Transfer(src=1, dst=r1)),
        recovery_step=5,
    )
    return plan.model_copy(update=update)


def _command(job_id: str, rng: random.Random, **update: Any) -> ExecutorCommand:
    cid = f"hostile-{rng.getrandbits(48):x}"
    cmd = ExecutorCommand(
        job_id=job_id,
        generation=0,
        producer="hostile",
        command_id=f"{cid}:pause:0",
        plan_id=cid,
        incident_id=cid,
        action=CommandAction.PAUSE,
    )
    return cmd.model_copy(update=update)


def _ack(job_id: str, node: str, rng: random.Random, **update: Any) -> CommandAck:
    cid = f"hostile-{rng.getrandbits(48):x}"
    ack = CommandAck(
        job_id=job_id,
        generation=0,
        producer="hostile",
        command_id=f"{cid}:pause:0",
        plan_id=cid,
        incident_id=cid,
        action=CommandAction.PAUSE,
        node_id=node,
    )
    return ack.model_copy(update=update)


def _progress(job_id: str, rng: random.Random, **update: Any) -> RecoveryProgress | RecoveryCompleted:
    cid = f"hostile-{rng.getrandbits(48):x}"
    if rng.random() < 0.5:
        return RecoveryProgress(
            job_id=job_id,
            generation=0,
            producer="hostile",
            incident_id=cid,
            plan_id=cid,
            phase="pause",
            status=PhaseStatus.STARTED,
            at=0.0,
        ).model_copy(update=update)
    return RecoveryCompleted(
        job_id=job_id, generation=0, producer="hostile", incident_id=cid, plan_id=cid, outcome="done"
    ).model_copy(update=update)


# ------------------------------------------------------------------ absurd values, per topic
def _dump(event: Any) -> dict[str, Any]:
    return copy.deepcopy(event.model_dump(mode="json"))


def _stamped(event: Any, rng: random.Random) -> bytes:
    """The event's bytes with an event id and time from `rng`: the same seed, the same bytes."""
    d = _dump(event)
    d["event_id"] = f"{rng.getrandbits(128):032x}"
    d["emitted_at"] = 1.7e9 + rng.random() * 1e8
    return orjson.dumps(d)


def _benign(d: dict[str, Any], rng: random.Random) -> None:
    """Absurd values that are not, alone, a reason to refuse: they ride along with a poison."""
    rows = d.get("ranks") or []
    if rng.random() < 0.5:
        d["step"] = -(10**6)
        for r in rows:
            r["step"] = -(10**6)
    if rng.random() < 0.5:
        for r in rows:
            r["since_progress_s"], r["step_time_s"] = 1e308, -1e308
    if rng.random() < 0.3:
        d["emitted_at"] = -1e18


TELEMETRY_POISONS = ("rank", "negative_rank", "generation", "rank_generation", "node", "ten_thousand")


def _absurd_telemetry(job: Job, rng: random.Random, i: int) -> tuple[str, bytes]:
    """A valid worker event of a real node carrying one value admission refuses."""
    node, ranks = _node_ranks(job, i)
    kind = rng.choice(("heartbeat", "heartbeat", "exit", "log"))
    if kind == "heartbeat":
        event: Any = _beat(job.job_id, node, ranks, seq=rng.randrange(1, 10**6))
    elif kind == "exit":
        event = WorkerExit(
            job_id=job.job_id, generation=0, producer="hostile", node_id=node, rank=ranks[0], pid=1, signal=9
        )
    else:
        event = LogEvent(
            job_id=job.job_id,
            generation=0,
            producer="hostile",
            node_id=node,
            rank=ranks[0],
            line="CUDA error: an illegal memory access was encountered",
        )
    poison = rng.choice(TELEMETRY_POISONS if kind == "heartbeat" else TELEMETRY_POISONS[:3] + ("node",))
    d = orjson.loads(_stamped(event, rng))
    rows = d.get("ranks") or []
    _benign(d, rng)
    if poison == "rank":
        (rows[0] if rows else d)["rank"] = 10**9
    elif poison == "negative_rank":
        (rows[-1] if rows else d)["rank"] = -7
    elif poison == "generation":
        d["generation"] = 10**6
    elif poison == "rank_generation":
        rows[0]["generation"] = 10**12
    elif poison == "node":
        d["node_id"] = f"ghost-{rng.randrange(10**6)}"
    elif poison == "ten_thousand":  # as columns: 10k rank objects would pass 1 MiB
        n = 10_000
        d["ranks"] = []
        d["rank_columns"] = {
            "rank": [job.world_size + k for k in range(n)],
            "local_rank": [0] * n,
            "pid": [1] * n,
            "state": ["running"] * n,
            "step": [1] * n,
            "generation": [0] * n,
            "since_progress_s": [0.0] * n,
        }
    return f"absurd:{kind}:{poison}", orjson.dumps(d)


INCIDENT_POISONS = {
    "ghost_node": dict(root_cause_nodes=("ghost-node",), root_cause_ranks=()),
    "ghost_rank": dict(root_cause_nodes=(), root_cause_ranks=(10**9,)),
    "negative_rank": dict(root_cause_nodes=(), root_cause_ranks=(-3,)),
    "ten_thousand": dict(root_cause_nodes=tuple(f"ghost-{k}" for k in range(10_000)), root_cause_ranks=()),
    "generation": dict(generation=10**12, root_cause_nodes=("ghost-node",)),
    "absurd_times": dict(root_cause_nodes=("ghost-node",), first_seen_at=-1e300, detected_at=1e300),
}
PLAN_POISONS = {
    "rank": dict(restart_ranks=(10**9,), replacements=(), transfers=()),
    "world": dict(world_size=-1),
    "big_world": dict(world_size=10**9),
    "generation": dict(target_generation=10**12),
    "no_restart": dict(restart_ranks=()),
    "ten_thousand": dict(restart_ranks=tuple(range(10_000))),
    "ghost_target": dict(
        replacements=(Replacement(rank=2, from_node="node-1", to_node="ghost", local_rank=0),),
    ),
    "source": dict(transfers=(Transfer(src=10**9, dst=2),)),
    "twice": dict(restart_ranks=(2, 2)),
    "not_recorded": {},  # well-formed, but the planner never recorded it: refused by identity
}
# Each alone makes the sidecars' command_refusal refuse the command (never acked, never acted on).
COMMAND_POISONS = {
    "generation": dict(generation=10**9),
    "token": dict(fence_token=10**18),
    "kill": dict(kill_ranks=(10**9,)),
    "negative_kill": dict(kill_ranks=(-1,)),
    "ten_thousand": dict(kill_ranks=tuple(range(100, 10_100))),
    "recover_world": dict(action=CommandAction.RECOVER, world_size=-1, resume_step=3),
    "recover_step": dict(action=CommandAction.RECOVER, world_size=-2, resume_step=-5),
    "transfer": dict(action=CommandAction.REPLACE, transfers=(Transfer(src=10**9, dst=1),)),
}
ACK_POISONS = {
    "ghost_node": dict(node_id="ghost"),
    "generation": dict(generation=10**12),
    "negative": dict(ok=False, detail="x" * 10_000),
    "unknown_command": {},
}


def _absurd_control(topic: T.Topic, job: Job, rng: random.Random) -> tuple[str, bytes, str]:
    """(category, value, expect) of a valid control-plane event for this job that its consumer
    must refuse (or, for acks, that matches no command and so moves nothing)."""
    if topic is T.INCIDENTS:
        k = rng.choice(sorted(INCIDENT_POISONS))
        return f"absurd:incident:{k}", _stamped(_incident(job.job_id, rng, **INCIDENT_POISONS[k]), rng), REFUSED
    if topic is T.PLANS:
        k = rng.choice(sorted(PLAN_POISONS))
        return f"absurd:plan:{k}", _stamped(_plan(job, rng, **PLAN_POISONS[k]), rng), REFUSED
    if topic is T.COMMANDS:
        k = rng.choice(sorted(COMMAND_POISONS))
        return f"absurd:command:{k}", _stamped(_command(job.job_id, rng, **COMMAND_POISONS[k]), rng), REFUSED
    if topic is T.ACKS:
        k = rng.choice(sorted(ACK_POISONS))
        return f"absurd:ack:{k}", _stamped(_ack(job.job_id, job.nodes[0], rng, **ACK_POISONS[k]), rng), REFUSED
    d = orjson.loads(_stamped(_progress(job.job_id, rng), rng))
    d["generation"] = 10**12
    return "absurd:recovery:generation", orjson.dumps(d), NO_CONSUMER


def _foreign(topic: T.Topic, job: Job, rng: random.Random) -> bytes:
    """A well-formed, plausible event of another job (same node names: they are its nodes)."""
    other = OTHER_JOB_ID
    node, ranks = _node_ranks(job, rng.randrange(len(job.nodes)))
    event: Any
    if topic is T.HEARTBEATS:
        event = _beat(other, node, ranks, seq=rng.randrange(1, 100))
    elif topic is T.WORKER_EVENTS:
        event = WorkerExit(job_id=other, generation=0, producer="hostile", node_id=node, rank=ranks[0], pid=1, signal=9)
    elif topic is T.INCIDENTS:
        event = _incident(other, rng, root_cause_nodes=(node,), root_cause_ranks=ranks[:1])
    elif topic is T.PLANS:
        event = _plan(job, rng, job_id=other)
    elif topic is T.COMMANDS:
        event = _command(other, rng, kill_ranks=ranks)
    elif topic is T.ACKS:
        event = _ack(other, node, rng)
    else:
        event = _progress(other, rng)
    return _stamped(event, rng)


def _good(topic: T.Topic, job: Job, rng: random.Random) -> bytes:
    """A valid record of `topic` for this job's real nodes: only ever cut short, padded past
    the size limit, or (signing on) sent as a forgery."""
    node, ranks = _node_ranks(job, rng.randrange(len(job.nodes)))
    event: Any
    if topic is T.HEARTBEATS:
        event = _beat(job.job_id, node, ranks, seq=rng.randrange(1, 100))
    elif topic is T.WORKER_EVENTS:
        event = WorkerExit(
            job_id=job.job_id, generation=0, producer="hostile", node_id=node, rank=ranks[0], pid=1, signal=9
        )
    elif topic is T.INCIDENTS:
        event = _incident(job.job_id, rng, root_cause_nodes=(node,), root_cause_ranks=ranks[:1])
    elif topic is T.PLANS:
        event = _plan(job, rng)
    elif topic is T.COMMANDS:
        event = _command(job.job_id, rng, kill_ranks=ranks)
    elif topic is T.ACKS:
        event = _ack(job.job_id, node, rng)
    else:
        event = _progress(job.job_id, rng)
    return _stamped(event, rng)


# ------------------------------------------------------------------ not an event at all
LITERALS = (
    b"",
    b"null",
    b"[]",
    b"[1, 2]",
    b'"str"',
    b"42",
    b"{}",
    b"\xff\xfe",
    b"{" * 5000,
    b'{"schema_version": 1, "kind": "worker_exit", "step_time_s": NaN}',
    b'{"schema_version": 1, "kind": "node_heartbeat", "interval_s": Infinity}',
    b'{"schema_version": 1, "kind": "node_heartbeat", "interval_s": 1e999}',
)


def _malformed(topic: T.Topic, job: Job, rng: random.Random, oversized: bool) -> tuple[str, bytes]:
    if oversized:
        d = orjson.loads(_good(topic, job, rng))
        # Cut short past the limit, so it is not an event: a whole one for a real node would be a
        # plausible forgery (unknown fields are ignored), which is not what this category tests.
        d["padding"] = "x" * OVERSIZED_BYTES
        return "oversized", orjson.dumps(d)[:OVERSIZED_BYTES]
    pick = rng.randrange(7)
    if pick == 0:
        return "random_bytes", rng.randbytes(rng.randrange(1, 400))
    if pick == 1:
        raw = _good(topic, job, rng)
        return "truncated", raw[: rng.randrange(len(raw))]
    if pick == 2:
        return "not_an_object", rng.choice(LITERALS)
    d = orjson.loads(_good(topic, job, rng))
    if pick == 3:
        d["kind"] = rng.choice(("node_reboot", "rm -rf", "", "NODE_HEARTBEAT"))
        return "unknown_kind", orjson.dumps(d)
    if pick == 4:
        d["schema_version"] = rng.choice((0, 2, 99, -1, "1", None))
        return "unknown_version", orjson.dumps(d)
    if pick == 5:
        d["generation"] = rng.choice((-1, "zero", None, 1.5))  # the envelope's generation: ge=0, int
        return "invalid_field", orjson.dumps(d)
    d.pop(rng.choice(("job_id", "producer", "generation")))
    return "missing_field", orjson.dumps(d)


# ------------------------------------------------------------------ forgeries (signing on)
def _forged_headers(
    kind: str, ring: Keyring, topic_name: str, other_topic: str, value: bytes, rng: random.Random
) -> tuple[tuple[str, bytes], ...]:
    if kind == "unsigned":
        return ()
    if kind == "wrong_key":  # a key id the job knows, a key it does not
        key = rng.randbytes(32)
        tag = hmac.new(key, topic_name.encode() + b"\n" + value, hashlib.sha256).hexdigest()
        return ((HEADER_KID, ring.active.encode()), (HEADER_TAG, tag.encode()))
    if kind == "unknown_key":
        return ((HEADER_KID, b"stolen"), (HEADER_TAG, b"0" * 64))
    # a genuine tag, made for another topic: a tag cannot be moved
    return tuple(ring.headers(other_topic, value))


FORGERIES = ("unsigned", "wrong_key", "unknown_key", "other_topic")


# ------------------------------------------------------------------ the stream
def generate(
    n: int,
    job: Job,
    seed: int = 0,
    topic_name: Callable[[T.Topic], str] = lambda t: t.name,
    keyring: Keyring | None = None,
    oversized: int = 3,
) -> Iterator[Hostile]:
    """n hostile records for `job`, dealt round-robin over TARGETS. topic_name: the topic names
    on the bus (its namespace). keyring: the job's keys when signing is on: every record that
    is not a forgery is signed with it (so it gets past the tag check and tests the decoders
    behind it), and a quarter of the records are forgeries of plausible events. oversized: how
    many records of 1 MiB+ (a few: the broker's message size limit applies)."""
    rng = random.Random(seed)
    big_at = set(rng.sample(range(n), min(oversized, n)))
    foreign: list[tuple[T.Topic, bytes]] = []  # sent again later: duplicates, out of order
    absurd: list[tuple[T.Topic, str, bytes, str]] = []
    for i in range(n):
        topic = TARGETS[i % len(TARGETS)]
        telemetry = topic in (T.HEARTBEATS, T.WORKER_EVENTS)
        name = topic_name(topic)
        key = job.nodes[i % len(job.nodes)].encode() if telemetry else job.job_id.encode()
        roll = rng.random()
        forged = keyring is not None and roll < 0.25 and i not in big_at
        if forged:
            assert keyring is not None
            kind = FORGERIES[i // len(TARGETS) % len(FORGERIES)]
            value = _good(topic, job, rng)
            others = [t for t in TARGETS if t is not topic]
            headers = _forged_headers(kind, keyring, name, topic_name(rng.choice(others)), value, rng)
            yield Hostile(topic, key, value, headers, f"forged:{kind}", UNAUTHENTICATED)
            continue
        if i in big_at or roll < 0.45:
            category, value = _malformed(topic, job, rng, oversized=i in big_at)
            expect = MALFORMED
        elif roll < 0.75:
            if telemetry:
                category, value = _absurd_telemetry(job, rng, i)
                expect = UNTRUSTED
            else:
                category, value, expect = _absurd_control(topic, job, rng)
            absurd.append((topic, category, value, expect))
        elif roll < 0.85 and absurd:
            # the same bytes again, long after: a redelivery or a replay
            topic, category, value, expect = rng.choice(absurd)
            name = topic_name(topic)
            telemetry = topic in (T.HEARTBEATS, T.WORKER_EVENTS)
            key = job.nodes[0].encode() if telemetry else job.job_id.encode()
            category = f"duplicate:{category}"
        elif roll < 0.93 or not foreign:
            value = _foreign(topic, job, rng)
            foreign.append((topic, value))
            category, expect = "other_job", UNTRUSTED if telemetry else OTHER_JOB
        else:
            # another job's record again, out of order (an older one after newer ones)
            topic, value = rng.choice(foreign[: max(1, len(foreign) // 2)])
            name = topic_name(topic)
            telemetry = topic in (T.HEARTBEATS, T.WORKER_EVENTS)
            key = OTHER_JOB_ID.encode()
            category, expect = "other_job:reordered_duplicate", UNTRUSTED if telemetry else OTHER_JOB
        if topic is T.RECOVERY:
            expect = NO_CONSUMER
        headers = tuple(keyring.headers(name, value)) if keyring is not None else ()
        yield Hostile(topic, key, value, headers, category, expect)
