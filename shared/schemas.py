"""Every event and command on the FlashRecovery bus: the public API of the event topics.

Evolution rules (docs/events.md): new fields get defaults; readers ignore unknown fields; a
breaking change bumps SCHEMA_VERSION and moves to a new topic suffix (see topics.py). A reader
rejects a version it does not know to the dead-letter topic rather than guessing.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


class SchemaError(ValueError):
    """Raw bytes that are not a valid event: the reason goes to the dead-letter record."""


class UnknownSchemaVersion(SchemaError):
    pass


def new_id() -> str:
    return uuid.uuid4().hex


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Envelope(Frozen):
    event_id: str = Field(default_factory=new_id)
    schema_version: int = SCHEMA_VERSION
    job_id: str
    generation: int = Field(ge=0)
    emitted_at: float = Field(default_factory=time.time)
    producer: str


# ---------------------------------------------------------------- worker side (sidecar -> bus)


class RankState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    RECOVERING = "recovering"
    STANDBY = "standby"
    EXITED = "exited"
    DONE = "done"
    # Set by the sidecar on a survivor that did not confirm a pause within pause_timeout_s: the
    # detector reports it hung at once (the clock-based hang check only judges RUNNING ranks).
    HUNG = "hung"


class RankStatus(Frozen):
    rank: int | None  # None for a standby worker that has no identity yet
    local_rank: int
    pid: int
    state: RankState
    step: int = -1  # last committed step, -1 before the first
    step_time_s: float | None = None
    generation: int = 0
    long_phase: str | None = None  # a declared long phase (eval, checkpoint save)
    long_phase_expected_s: float | None = None
    # Seconds since this rank's step last advanced, measured by the sidecar's own monotonic
    # clock so the detector never compares two machines' wall clocks.
    since_progress_s: float = 0.0
    # The OS scheduler state of the process as the sidecar reads it (/proc/<pid>/stat: R, S, D,
    # T = stopped, t = traced, Z = zombie). A hang leaves every rank stalled at the same step;
    # only this tells the frozen process from its peers blocked in a collective.
    proc_state: str | None = None


class NodeRole(StrEnum):
    ACTIVE = "active"
    SPARE = "spare"
    QUARANTINED = "quarantined"


# The fields of RankStatus in the order of a rank row (NodeHeartbeat.rank_rows()).
RANK_ROW = (
    "rank",
    "local_rank",
    "pid",
    "state",
    "step",
    "step_time_s",
    "generation",
    "long_phase",
    "long_phase_expected_s",
    "since_progress_s",
    "proc_state",
)


class _Columns(Frozen):
    """Per-rank data as columns: entry i of every column is rank i's value."""

    def _mismatch(self, names: tuple[str, ...]) -> ValueError:
        n = len(getattr(self, "rank"))  # noqa: B009 - declared by each subclass, not here
        bad = [f for f in names if getattr(self, f) is not None and len(getattr(self, f)) != n]
        return ValueError(f"columns {bad} do not have one entry per rank ({n})")


def _check_one_form(objects: tuple[Any, ...], columns: _Columns | None, objects_name: str, columns_name: str) -> None:
    if objects and columns is not None:
        raise ValueError(f"{objects_name} and {columns_name} are exclusive: send one form")


class RankColumns(_Columns):
    """A node's ranks as columns: entry i of every column is rank i's RankStatus field. The same
    content as NodeHeartbeat.ranks, about half the bytes, and ~2.5x cheaper to validate (one
    model instead of one per rank): heartbeats are nearly all the bus traffic, 12,500/s at 100k
    ranks. An optional column left out (None) means None for every rank."""

    rank: tuple[int | None, ...]
    local_rank: tuple[int, ...]
    pid: tuple[int, ...]
    state: tuple[RankState, ...]
    step: tuple[int, ...]
    step_time_s: tuple[float | None, ...] | None = None
    generation: tuple[int, ...]
    long_phase: tuple[str | None, ...] | None = None
    long_phase_expected_s: tuple[float | None, ...] | None = None
    since_progress_s: tuple[float, ...]
    proc_state: tuple[str | None, ...] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> RankColumns:
        # Runs on every compact heartbeat: a plain comparison first, the names only on failure.
        n = len(self.rank)
        if (
            len(self.local_rank)
            == len(self.pid)
            == len(self.state)
            == len(self.step)
            == len(self.generation)
            == len(self.since_progress_s)
            == n
        ) and all(
            c is None or len(c) == n
            for c in (self.step_time_s, self.long_phase, self.long_phase_expected_s, self.proc_state)
        ):
            return self
        raise self._mismatch(RANK_ROW)

    @classmethod
    def of(cls, ranks: tuple[RankStatus, ...] | list[RankStatus]) -> RankColumns:
        cols: dict[str, tuple[Any, ...] | None] = {f: tuple(getattr(r, f) for r in ranks) for f in RANK_ROW}
        for f in ("step_time_s", "long_phase", "long_phase_expected_s", "proc_state"):
            if all(v is None for v in cols[f] or ()):
                cols[f] = None
        return cls(**cols)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        n = len(self.rank)
        none = (None,) * n
        return zip(
            self.rank,
            self.local_rank,
            self.pid,
            self.state,
            self.step,
            self.step_time_s or none,
            self.generation,
            self.long_phase or none,
            self.long_phase_expected_s or none,
            self.since_progress_s,
            self.proc_state or none,
        )


class NodeHeartbeat(Envelope):
    """A node's ranks come either as `ranks` (one object per rank) or as `rank_columns` (the
    compact form, sidecar setting rank_columns; a reader that predates it sees no ranks),
    never both. Readers go through rank_rows() / rank_statuses(), which serve both."""

    kind: Literal["node_heartbeat"] = "node_heartbeat"
    node_id: str
    role: NodeRole = NodeRole.ACTIVE
    seq: int = Field(ge=0)  # per-node counter: lets readers drop reordered or duplicated beats
    interval_s: float = 1.0
    ranks: tuple[RankStatus, ...] = ()
    standby_ready: int = 0
    rank_columns: RankColumns | None = None

    @model_validator(mode="after")
    def _one_form(self) -> NodeHeartbeat:
        _check_one_form(self.ranks, self.rank_columns, "ranks", "rank_columns")
        return self

    def rank_rows(self) -> Iterator[tuple[Any, ...]]:
        """(rank, local_rank, pid, state, step, step_time_s, generation, long_phase,
        long_phase_expected_s, since_progress_s, proc_state) per rank: the hot path's view."""
        if self.rank_columns is not None:
            return self.rank_columns.rows()
        return (
            (
                r.rank,
                r.local_rank,
                r.pid,
                r.state,
                r.step,
                r.step_time_s,
                r.generation,
                r.long_phase,
                r.long_phase_expected_s,
                r.since_progress_s,
                r.proc_state,
            )
            for r in self.ranks
        )

    def rank_statuses(self) -> tuple[RankStatus, ...]:
        if self.rank_columns is None:
            return self.ranks
        return tuple(RankStatus(**dict(zip(RANK_ROW, row))) for row in self.rank_columns.rows())


class WorkerExit(Envelope):
    kind: Literal["worker_exit"] = "worker_exit"
    node_id: str
    rank: int | None
    pid: int
    exit_code: int | None = None
    signal: int | None = None
    step: int = -1
    expected: bool = False  # a clean finish or a kill the executor ordered


class LogEvent(Envelope):
    kind: Literal["log_event"] = "log_event"
    node_id: str
    rank: int | None
    stream: Literal["stdout", "stderr"] = "stderr"
    line: str
    hint: str | None = None  # the sidecar's cheap pre-filter match; the detector decides


# ---------------------------------------------------------------- detector


class FaultClass(StrEnum):
    PROCESS_CRASH = "process_crash"
    NODE_LOST = "node_lost"
    HANG = "hang"
    HARDWARE = "hardware"
    COMMUNICATION = "communication"
    OUT_OF_MEMORY = "out_of_memory"
    SOFTWARE = "software"
    STRAGGLER = "straggler"


class RepairAction(StrEnum):
    REPLACE_NODE = "replace_node"  # hardware or node loss: every rank of the node moves
    RESTART_PROCESS = "restart_process"  # software: only the failed process restarts
    NONE = "none"


class Evidence(Frozen):
    source: str  # event kind that contributed
    node_id: str
    rank: int | None = None
    detail: str = ""
    observed_at: float  # receive time at the detector (its own clock)


class FaultIncident(Envelope):
    kind: Literal["fault_incident"] = "fault_incident"
    incident_id: str
    fault_class: FaultClass
    action: RepairAction
    root_cause_nodes: tuple[str, ...]
    root_cause_ranks: tuple[int, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    symptoms_attributed: int = 0
    confidence: float = Field(ge=0.0, le=1.0, default=1.0)
    first_seen_at: float
    detected_at: float
    reason: str = ""


class Degradation(Envelope):
    """A rank persistently slower than its peers (a straggler): reported for operators, never
    recovered automatically."""

    kind: Literal["degradation"] = "degradation"
    node_id: str
    rank: int
    fault_class: FaultClass = FaultClass.STRAGGLER
    step_time_s: float
    median_step_time_s: float
    consecutive: int
    reason: str = ""


# ---------------------------------------------------------------- planner


class Replacement(Frozen):
    rank: int
    from_node: str
    to_node: str
    local_rank: int
    mode: Literal["standby", "in_place"] = "standby"


class Transfer(Frozen):
    src: int
    dst: int


class Fallback(StrEnum):
    NONE = "none"
    CHECKPOINT = "checkpoint"  # a shard lost every replica: restore from durable checkpoint
    SHRINK = "shrink"  # no spare: drop whole data-parallel replica groups
    WAIT = "wait"  # no spare: wait for capacity


class RecoveryPlan(Envelope):
    kind: Literal["recovery_plan"] = "recovery_plan"
    plan_id: str
    incident_ids: tuple[str, ...]
    supersedes: str | None = None
    target_generation: int
    world_size: int
    restart_ranks: tuple[int, ...]
    faulty_nodes: tuple[str, ...]
    replacements: tuple[Replacement, ...]
    transfers: tuple[Transfer, ...]
    recovery_step: int  # from the registry; the executor refines it with the commit rule
    rebuild_groups: tuple[str, ...] = ()
    quarantine_nodes: tuple[str, ...] = ()
    fallback: Fallback = Fallback.NONE
    steps_lost_estimate: int = 0
    reasons: tuple[str, ...] = ()


class Escalation(Envelope):
    kind: Literal["escalation"] = "escalation"
    incident_ids: tuple[str, ...]
    plan_id: str | None = None
    reason: str


# ---------------------------------------------------------------- executor <-> sidecars


class CommandAction(StrEnum):
    PAUSE = "pause"  # healthy ranks break out of collectives and report their commit state
    REPLACE = "replace"  # faulty nodes kill what is left; spares assign standbys
    RECOVER = "recover"  # rebuild groups for a generation, restore, resume
    STOP = "stop"


class Assignment(Frozen):
    rank: int
    local_rank: int
    node_id: str


class ExecutorCommand(Envelope):
    kind: Literal["executor_command"] = "executor_command"
    command_id: str
    plan_id: str
    incident_id: str
    action: CommandAction
    # None = every node of the job. Commands to healthy ranks are one broadcast, never a list
    # that grows with the cluster.
    nodes: tuple[str, ...] | None = None
    kill_ranks: tuple[int, ...] = ()
    assignments: tuple[Assignment, ...] = ()
    world_size: int = 0
    commit_step: int | None = None
    resume_step: int | None = None
    transfers: tuple[Transfer, ...] = ()
    attempt: int = 0
    # PAUSE and RECOVER: the nodes that report (RECOVER: each stage, rebuilt, restored, resumed,
    # verified). Any other node reports only a failure. None (the default, and what a producer
    # that predates the field means): every node reports.
    stage_nodes: tuple[str, ...] | None = None
    # RECOVER: the survivors decide commit_step and resume_step among themselves in the rebuild's
    # allreduce (docs/commit-protocol.md "The in-band decision"); the command carries neither,
    # and the stage nodes' `rebuilt` reports carry the decision back.
    in_band: bool = False
    # The sending executor's lease fence token: a new leader's token is higher than every
    # earlier leader's. Sidecars refuse a command whose token is lower than the highest they
    # have seen (a deposed leader still sending). None: a producer without a lease (tools).
    fence_token: int | None = None


class RankReport(Frozen):
    rank: int
    pid: int | None = None
    applied_step: int = -1
    grads_step: int | None = None
    vote_step: int = -1
    phase: str | None = None
    seconds: float | None = None
    bytes: int | None = None
    digest_ok: bool | None = None
    # `rebuilt` of an in-band recovery: the decision the rank reached (commit_step None and
    # resume_step set: nothing to commit), and the furthest step a survivor had computed.
    commit_step: int | None = None
    resume_step: int | None = None
    computed_step: int | None = None


REPORT_ROW = tuple(RankReport.model_fields)


# One rank's report as a plain tuple (CommandAck.report_rows()): what the executor reads,
# whichever form the ack came in. RankReport's fields and defaults, in its order; built from the
# model so the two cannot drift (typed Any: a tuple class made at run time).
_tuple_class: Callable[..., Any] = collections.namedtuple
ReportRow: Any = _tuple_class(
    "ReportRow", REPORT_ROW, defaults=tuple(f.default for f in list(RankReport.model_fields.values())[1:])
)


class ReportColumns(_Columns):
    """A node's RankReports as columns (entry i of each = rank i), like RankColumns for
    heartbeats: the pause and verify acks of a recovery are 2 per node, 25,000 at 100k ranks,
    and this form is ~2.5x cheaper for the executor to decode. A column left out (None) holds
    RankReport's default for every rank."""

    rank: tuple[int, ...]
    pid: tuple[int | None, ...] | None = None
    applied_step: tuple[int, ...] | None = None
    grads_step: tuple[int | None, ...] | None = None
    vote_step: tuple[int, ...] | None = None
    phase: tuple[str | None, ...] | None = None
    seconds: tuple[float | None, ...] | None = None
    bytes: tuple[int | None, ...] | None = None
    digest_ok: tuple[bool | None, ...] | None = None
    commit_step: tuple[int | None, ...] | None = None
    resume_step: tuple[int | None, ...] | None = None
    computed_step: tuple[int | None, ...] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> ReportColumns:
        n = len(self.rank)
        if all(c is None or len(c) == n for c in (getattr(self, f) for f in REPORT_ROW[1:])):
            return self
        raise self._mismatch(REPORT_ROW)

    @classmethod
    def of(cls, reports: tuple[RankReport, ...] | list[RankReport]) -> ReportColumns:
        defaults = ReportRow(rank=0)
        cols: dict[str, Any] = {"rank": tuple(r.rank for r in reports)}
        for i, f in enumerate(REPORT_ROW[1:], start=1):
            col = tuple(getattr(r, f) for r in reports)
            cols[f] = None if all(v == defaults[i] for v in col) else col
        return cls(**cols)

    def rows(self) -> tuple[ReportRow, ...]:
        n = len(self.rank)
        defaults = ReportRow(rank=0)
        cols = [self.rank] + [getattr(self, f) or (defaults[i],) * n for i, f in enumerate(REPORT_ROW[1:], 1)]
        return tuple(ReportRow._make(row) for row in zip(*cols))


class CommandAck(Envelope):
    """Per-rank reports come as `ranks` (one object per rank) or `report_columns` (the compact
    form, sidecar setting rank_columns), never both; readers call report_rows()."""

    kind: Literal["command_ack"] = "command_ack"
    command_id: str
    plan_id: str
    incident_id: str
    action: CommandAction
    node_id: str
    ok: bool = True
    stage: str = "done"  # a command may ack in stages (e.g. recover: rebuilt, restored, resumed)
    detail: str = ""
    ranks: tuple[RankReport, ...] = ()  # aggregated per node
    report_columns: ReportColumns | None = None

    @model_validator(mode="after")
    def _one_form(self) -> CommandAck:
        _check_one_form(self.ranks, self.report_columns, "ranks", "report_columns")
        return self

    def report_rows(self) -> tuple[ReportRow, ...]:
        if self.report_columns is not None:
            return self.report_columns.rows()
        return tuple(ReportRow._make(getattr(r, f) for f in REPORT_ROW) for r in self.ranks)

    def vote_rows(self) -> Iterator[tuple[int, int, int | None, int]]:
        """(rank, applied_step, grads_step, vote_step) per rank, as plain tuples: a pause's
        commit reports at 100k ranks without an object per rank."""
        c = self.report_columns
        if c is None:
            return ((r.rank, r.applied_step, r.grads_step, r.vote_step) for r in self.ranks)
        n = len(c.rank)
        return zip(c.rank, c.applied_step or (-1,) * n, c.grads_step or (None,) * n, c.vote_step or (-1,) * n)


# ---------------------------------------------------------------- recovery progress


class PhaseStatus(StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class RecoveryProgress(Envelope):
    kind: Literal["recovery_progress"] = "recovery_progress"
    incident_id: str
    plan_id: str
    phase: str
    status: PhaseStatus
    at: float
    detail: str = ""


class RecoveryCompleted(Envelope):
    kind: Literal["recovery_completed"] = "recovery_completed"
    incident_id: str
    plan_id: str
    outcome: Literal["done", "failed", "superseded"]
    fault_class: FaultClass | None = None
    phase_seconds: dict[str, float] = Field(default_factory=dict)
    detection_latency_s: float | None = None
    rto_s: float | None = None
    recovery_step: int | None = None
    steps_recomputed: int = 0
    committed_steps_lost: int = 0
    reason: str = ""


Event = Annotated[
    Union[
        NodeHeartbeat,
        WorkerExit,
        LogEvent,
        FaultIncident,
        Degradation,
        RecoveryPlan,
        Escalation,
        ExecutorCommand,
        CommandAck,
        RecoveryProgress,
        RecoveryCompleted,
    ],
    Field(discriminator="kind"),
]
_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)
# The members of Event, for code that walks them (schema export, broker schemas, kinds).
EVENT_MODELS: tuple[type[Envelope], ...] = typing.get_args(typing.get_args(Event)[0])
EVENT_KINDS = tuple(m.model_fields["kind"].default for m in EVENT_MODELS)


def encode(event: BaseModel) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def decode(raw: bytes | None) -> Any:
    """Bytes -> a typed event, or SchemaError naming what is wrong."""
    if raw is None:
        raise SchemaError("empty message (tombstone)")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SchemaError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise UnknownSchemaVersion(
            f"schema_version {version!r} not supported (supported: {sorted(SUPPORTED_VERSIONS)})"
        )
    if data.get("kind") not in EVENT_KINDS:
        raise SchemaError(f"unknown kind {data.get('kind')!r}")
    try:
        return _EVENT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SchemaError(f"invalid {data.get('kind')}: {where}: {first['msg']}") from None


DEAD_LETTER_RAW_LIMIT = 64 * 1024  # raw bytes kept in a dead letter (its base64 is 4/3 of it)
DEAD_LETTER_TEXT_LIMIT = 2048  # characters kept of a dead letter's reason and key


class DeadLetter(Frozen):
    """What a consumer could not handle. Kept whole up to DEAD_LETTER_RAW_LIMIT bytes; a larger
    message keeps a prefix (raw_b64), its size and its SHA-256, so a dead letter always fits on
    the broker (a 2 MB poison message once took the detector and planner down because its
    base64 copy could not be produced). `raw_size`, `raw_sha256`, `raw_truncated`, `kind` and
    `schema_version` were added in 1.x: a letter written before them has none (defaults)."""

    kind: Literal["dead_letter"] = "dead_letter"
    schema_version: int = SCHEMA_VERSION
    topic: str
    partition: int
    offset: int
    key: str | None
    reason: str
    raw_b64: str  # the raw bytes, or their first DEAD_LETTER_RAW_LIMIT bytes (raw_truncated)
    consumer: str
    at: float = Field(default_factory=time.time)
    raw_size: int | None = None  # the original message's size in bytes
    raw_sha256: str | None = None  # hex digest of the whole original message
    raw_truncated: bool = False

    @classmethod
    def of(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        consumer: str,
        limit: int = DEAD_LETTER_RAW_LIMIT,
    ) -> DeadLetter:
        raw = value or b""
        text = key.decode(errors="replace") if key else None
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=text[:DEAD_LETTER_TEXT_LIMIT] if text is not None else None,
            reason=reason[:DEAD_LETTER_TEXT_LIMIT],
            consumer=consumer[:200],
            raw_b64=base64.b64encode(raw[:limit]).decode(),
            raw_size=len(raw),
            raw_sha256=hashlib.sha256(raw).hexdigest(),
            raw_truncated=len(raw) > limit,
        )


def decode_dead_letter(raw: bytes | None) -> DeadLetter:
    """A record of the dead-letter topic (written before or after the 1.x fields), or SchemaError."""
    if raw is None:
        raise SchemaError("empty message (tombstone)")
    try:
        return DeadLetter.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SchemaError(f"invalid dead letter: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
