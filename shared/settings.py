"""Configuration, validated at start-up; every setting is a field here, with its default and
description written once (docs/configuration.md is generated from these models).

Two components read the environment, each under its own prefix:
- the services and the command line (`Settings`): FLASHRECOVERY_, nested groups with a double
  underscore (FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES=5);
- the agent inside every training process (`AgentSettings`): FLASHRECOVERY_AGENT_, set for each
  worker by its launcher (the sidecar, services/sidecar/core.worker_env).
A FLASHRECOVERY_ name that neither accepts is reported at start-up (`unknown_env`)."""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FLASHRECOVERY_"
AGENT_ENV_PREFIX = "FLASHRECOVERY_AGENT_"
NESTED_DELIMITER = "__"
DEFAULT_JOB_ID = "demo"  # the services' and the agent's, so an unset id names one job
# A state transfer's window (agent/transfer.py): posted together, then waited for together.
TRANSFER_WINDOW_BYTES = 64 << 20

NoSparePolicy = Literal["wait"]  # "shrink" is refused by PlannerSettings with its reason
Role = Literal["active", "spare"]
LogFormat = Literal["auto", "json", "console"]
Backend = Literal["gloo", "nccl"]

# FLASHRECOVERY_ names that something other than the settings models reads: not typos.
OTHER_ENV = {
    "FLASHRECOVERY_HEALTH_ARGS": "Arguments of the container health check's `flashrecovery health` (deploy/Dockerfile).",
    "FLASHRECOVERY_TEST_KAFKA": "Tests only: a running broker to use instead of starting one (tests/conftest.py).",
    "FLASHRECOVERY_TEST_REDIS": "Tests only: a running Redis to use instead of starting one (tests/conftest.py).",
}


class KafkaSecuritySettings(BaseModel):
    """How every Kafka client of FlashRecovery authenticates and encrypts (aiokafka's options).
    The embedded broker speaks PLAINTEXT unless started behind FlashRecovery's SASL/SCRAM + TLS
    gateway (docs/security.md); production brokers want SASL_SSL with SCRAM-SHA-512 and one
    principal per service."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol; production brokers want SASL_SSL."
    )
    ssl_cafile: str | None = Field(None, description="CA bundle that signed the brokers' certificates.")
    ssl_certfile: str | None = Field(None, description="Client certificate (mutual TLS), with ssl_keyfile.")
    ssl_keyfile: str | None = Field(None, description="Client key (mutual TLS), with ssl_certfile.")
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism."
    )
    sasl_username: str | None = Field(None, description="SASL user (one principal per service).")
    # A file, so the password is in no environment listing.
    sasl_password_file: str | None = Field(None, description="File holding the SASL password (a mounted Secret).")

    @model_validator(mode="after")
    def _complete(self) -> KafkaSecuritySettings:
        if self.protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password_file):
            raise ValueError(f"protocol {self.protocol} needs sasl_username and sasl_password_file")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        return self


class BusSettings(BaseModel):
    telemetry_partitions: int = Field(
        8,
        ge=1,
        le=1024,
        description=("Partitions of the telemetry topics (heartbeats, exits, logs); detector instances split them."),
    )
    control_partitions: int = Field(1, ge=1, le=64, description="Partitions of the control topics.")
    linger_ms: int = Field(5, ge=0, le=1000, description="Producer batching delay.")
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=10_000,
        description=(
            "How long the broker may hold a consumer's fetch that finds no record. The embedded "
            "broker does not answer a held fetch as soon as a record arrives, so this wait sets "
            "each hop's delay while every idle consumer sends up to 1000/wait fetches a second: "
            "100 there (the measured trade-off: docs/operations.md). A broker that answers at once "
            "(Apache Kafka) gives the same hop delay at any wait: use 500 there."
        ),
    )
    max_batch_bytes: int = Field(1 << 20, ge=1024, description="Producer batch size limit.")
    handler_retries: int = Field(
        3, ge=0, le=20, description=("Retries of a failing message handler before the message is dead-lettered.")
    )
    topic_namespace: str = Field(
        "", description=("Prefix of every topic name: lets tests and side-by-side jobs share a broker.")
    )
    security: KafkaSecuritySettings = KafkaSecuritySettings()
    signing_key_file: str | None = Field(
        None,
        description=(
            "JSON key file (e.g. a mounted Secret) for authentication tags on incidents, plans and "
            "commands (docs/security.md): producers sign, consumers dead-letter records untagged, "
            "forged or signed with an unknown key. Unset: no tags."
        ),
    )
    require_signatures: bool = Field(
        True,
        description=(
            "false only while a deployment moves to signing: tags are added and checked, but a record "
            "without one is still accepted (a forged or unknown-key tag is refused either way)."
        ),
    )

    @field_validator("signing_key_file")
    @classmethod
    def _key_file(cls, v: str | None) -> str | None:
        if v:
            from .signing import KeyringError, load_keyring

            try:
                load_keyring(v)
            except KeyringError as exc:
                raise ValueError(str(exc)) from None
        return v

    # Durability. The defaults suit the embedded one-broker stack; on a production Kafka cluster
    # use replication_factor=3, min_insync_replicas=2, producer_acks=all, idempotence=true
    # (docs/runbook.md): an incident or a command then survives the loss of one broker.
    replication_factor: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Replication factor of the topics FlashRecovery creates (existing topics are left alone). "
            "1 for the embedded broker; 3 in production."
        ),
    )
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        le=16,
        description=(
            "Topic config min.insync.replicas of the topics created; unset: the broker's default. With "
            "producer_acks=all a write succeeds only once this many replicas have it. 2 in production."
        ),
    )
    producer_acks: Literal["0", "1", "all"] = Field(
        "1",
        description=(
            "Producer acks: 1 = the partition leader has the record (embedded default), all = every "
            "in-sync replica has it (production)."
        ),
    )
    idempotence: bool = Field(
        False,
        description=(
            "Idempotent producer: a retried send is written once. Needs producer_acks=all; on in "
            "production, off for the embedded broker."
        ),
    )

    @model_validator(mode="after")
    def _durability(self) -> BusSettings:
        if self.idempotence and self.producer_acks != "all":
            raise ValueError("idempotence needs producer_acks=all")
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"min_insync_replicas {self.min_insync_replicas} exceeds replication_factor "
                f"{self.replication_factor}: no write could ever succeed"
            )
        return self


class DetectorSettings(BaseModel):
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description=("Heartbeat interval assumed for a heartbeat that declares none.")
    )
    heartbeat_misses: int = Field(3, ge=1, description="Missed heartbeats after which a node is lost.")
    hang_floor_s: float = Field(5.0, gt=0, description="Least stall reported as a hang.")
    hang_k: float = Field(
        10.0, gt=1, description=("A hang is a stall longer than max(hang_k x p99 step time, hang_floor_s).")
    )
    correlation_window_s: float = Field(
        3.0, gt=0, description=("How long a communication error is held for a root cause to explain it.")
    )
    straggler_factor: float = Field(2.0, gt=1, description=("A step this many times the median step time is slow."))
    straggler_consecutive: int = Field(
        5, ge=1, description=("Slow steps in a row after which a rank is reported degraded.")
    )
    signatures_path: str | None = Field(
        None, description=("An operator's extra signature catalog (JSON), added to the built-in one.")
    )


class ExecutorSettings(BaseModel):
    phase_timeout_s: float = Field(
        60.0, gt=0, description=("Bound on the wait for one recovery phase's acknowledgements.")
    )
    phase_retries: int = Field(
        2, ge=0, description=("Times a phase's command is sent again after its wait ran out, before the plan fails.")
    )
    command_resend_s: float = Field(
        2.0,
        ge=0,
        description=(
            "While a phase waits for acknowledgements, its command is sent again (same id) at this "
            "interval, so a command the bus lost costs seconds, not the phase timeout. 0: only on timeout."
        ),
    )
    lease_ttl_s: float = Field(
        3.0,
        gt=0,
        description=(
            "TTL of the leading executor's lease: a standby instance takes over at most this long "
            "after the leader stops renewing it."
        ),
    )
    # Issue #14 item 2: a recovery must not cost the executor a report per healthy node.
    in_band_commit: bool = Field(
        True,
        description=(
            "Survivors decide the commit and resume steps among themselves in the rebuild's "
            "allreduce; only nodes that lost a rank report the pause. false: every node reports "
            "its ranks' pause counters and the executor decides."
        ),
    )
    # A plan that fails because a second fault hit it is usually followed within ~0.1 s by the
    # planner's superseding plan.
    supersede_grace_s: float = Field(
        2.0, ge=0, description=("How long a failed plan waits for a superseding plan before the failure is escalated.")
    )


class PlannerSettings(BaseModel):
    # With a warm standby on every node (sidecar.standbys) a restart in place is as fast as a
    # move to a spare, and keeps the spare's slots for the node losses only a spare can absorb.
    restart_in_place_for_software: bool = Field(
        True,
        description=(
            "Restart a rank with a software fault on its own node (from the node's warm standby) "
            "instead of moving it to a spare's standby."
        ),
    )
    # Only "wait": "shrink" needs rank renumbering and state transfers that are not implemented,
    # so it is refused here (with its own message) rather than driven into a broken job.
    no_spare_policy: NoSparePolicy = Field(
        "wait",
        description=(
            "When no spare can take a replaced node's ranks: wait (pause, escalate, re-plan when "
            "capacity arrives). shrink is not supported."
        ),
    )
    quarantine_faults: int = Field(
        2, ge=1, description=("Faults of one node within quarantine_window_s after which it is quarantined.")
    )
    quarantine_window_s: float = Field(3600.0, gt=0, description="Window of quarantine_faults.")

    @field_validator("no_spare_policy", mode="before")
    @classmethod
    def _policy(cls, v: object) -> object:
        if v == "shrink":
            raise ValueError(
                "'shrink' is not supported yet (no rank renumbering or state transfer for a smaller world): use 'wait'"
            )
        return v


class SidecarSettings(BaseModel):
    node_id: str = Field("node-0", description="This node's id in the job's topology.")
    role: Role = Field(
        "active", description=("active: hosts the ranks in `ranks`; spare: keeps standbys for replaced ranks.")
    )
    ranks: str = Field(
        "", description=("Comma-separated global ranks hosted here; a rank's local rank is its position.")
    )
    world_size: int = Field(0, ge=0, description="The job's number of ranks.")
    capacity: int = Field(2, ge=0, description="Ranks the node can host (its accelerators).")
    # Issue #14 item 1: a software fault restarts the rank in place (planner policy
    # restart_in_place_for_software) from a process that has already imported torch, in the
    # same ~0.1 s as a spare's standby; without one the node cold-starts a process while the
    # whole job waits (seconds on a loaded machine).
    standbys: int = Field(
        1,
        ge=0,
        description=(
            "Warm standby workers an active node keeps for restarts in place, started again once "
            "its ranks train after a recovery; 0: a cold start. A spare keeps one per free slot instead."
        ),
    )
    # Issue #14: without the zygote, a standby started again after a recovery imports torch while
    # the job trains; this nices only its importing thread (sidecar/warm_start.py), so the rank
    # it becomes is not. Off by default: measured, it did not help (docs/benchmarks.md).
    standby_refill_nice: int = Field(
        0,
        ge=0,
        le=19,
        description=(
            "Niceness of the thread in which a standby started after a recovery imports "
            "standby_preimport (its main thread keeps worker_nice); 0: no such thread."
        ),
    )
    # Issue #14: a fork of a process that has imported torch is ready in a fraction of a second,
    # where a new interpreter costs ~4-8 CPU-s (sidecar/zygote.py).
    standby_fork: bool = Field(
        True,
        description=(
            "Fork this node's standbys from one process (the zygote) that has imported "
            "standby_preimport once; false: every standby is a new interpreter."
        ),
    )
    # A node's ranks are its standbys' siblings: forked from the same zygote at the job's start,
    # one import per node instead of one per rank (the job's start-up on a loaded machine).
    rank_fork: bool = Field(
        True,
        description=(
            "Where the node has a zygote (standby_fork, standbys > 0), fork its ranks from it at "
            "the job's start too; false: each rank starts as a new interpreter."
        ),
    )
    # torch._dynamo: the first optimizer a job builds imports it (with sympy), ~1.8 CPU-s that
    # every forked rank and standby paid again after the fork.
    standby_preimport: str = Field(
        "torch,torch._dynamo,flashrecovery.agent.managed",
        description=(
            "Comma-separated modules the zygote imports before it forks standbys (or, without "
            "it, a refill standby in its low-priority thread)."
        ),
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Interval of this node's heartbeats.")
    # Off by default: a subscriber that predates the compact forms would see no ranks.
    rank_columns: bool = Field(
        False,
        description=(
            "Send per-rank data as columns (heartbeats' rank_columns, acks' report_columns): half the "
            "bytes, about twice cheaper to decode."
        ),
    )
    # A module or a script, never both; then worker_args, shell-quoted, passed unchanged.
    worker_module: str = Field(
        "flashrecovery.agent.reference.train",
        description=("What every worker runs as `python -m MODULE` (unset when worker_script is set)."),
    )
    worker_script: str = Field("", description="What every worker runs as `python SCRIPT`.")
    worker_args: str = Field("", description="The workers' arguments, shell-quoted.")
    node_rank: int = Field(
        -1,
        ge=-1,
        description=(
            "The node's rank among the job's nodes (torchrun's GROUP_RANK); -1: the first hosted "
            "rank divided by the ranks hosted here."
        ),
    )
    # Sidecars sharing one machine: run --standalone registers one node per tensor-parallel group.
    local_rank_base: int = Field(
        0,
        ge=0,
        description=("Added to a worker's position to make torchrun's LOCAL_RANK (sidecars sharing one machine)."),
    )
    local_world_size: int = Field(0, ge=0, description=("torchrun's LOCAL_WORLD_SIZE; 0: the ranks hosted here."))
    exit_with_job: bool = Field(
        False,
        description=(
            "`flashrecovery run`: exit 0 once every rank of the job has finished, and 1 as soon as a "
            "worker fails in a way no recovery can repair (a plain script's rank died)."
        ),
    )
    # A rank blocked rebuilding groups with a peer that died meanwhile cannot answer a pause
    # until its rebuild gives up; the pause wait must outlast that bound.
    rebuild_timeout_s: float = Field(
        15.0, gt=0, description=("Bound on a worker's group rebuild (passed to the agent).")
    )
    pause_timeout_s: float = Field(
        25.0,
        gt=0,
        description=(
            "How long a rank may take to confirm a pause before it is marked hung (outlasts rebuild_timeout_s)."
        ),
    )
    # On a machine whose cores the control plane shares with the trainers (the local demo), a
    # positive niceness keeps heartbeats on time while torch imports saturate the CPU.
    worker_nice: int = Field(0, ge=0, le=19, description="Niceness of the workers.")
    log_lines_per_s: float = Field(20.0, gt=0, description="Rate limit of forwarded worker log lines.")
    log_burst: int = Field(50, ge=1, description="Burst of the forwarded log line rate limit.")

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: str) -> str:
        if v and not all(p.strip().isdigit() for p in v.split(",")):
            raise ValueError("must be comma-separated rank numbers")
        return v

    @model_validator(mode="after")
    def _one_entry_point(self) -> SidecarSettings:
        module = self.worker_module if "worker_module" in self.model_fields_set or not self.worker_script else ""
        if bool(module) == bool(self.worker_script):
            raise ValueError(
                "set exactly one of worker_module and worker_script "
                f"(got module {module!r}, script {self.worker_script!r})"
            )
        return self

    def rank_list(self) -> list[int]:
        return [int(p) for p in self.ranks.split(",") if p.strip()]


class Settings(BaseSettings):
    """The services' and the command line's settings (FLASHRECOVERY_...)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="ignore")

    job_id: str = Field(DEFAULT_JOB_ID, description="The job the services serve.")
    kafka_bootstrap: str | None = Field(
        None, description=("Kafka bootstrap address; unset: the embedded stack starts a local broker.")
    )
    redis_url: str | None = Field(
        None, description=("Redis URL; unset: the embedded stack starts a local redis-server.")
    )
    runtime_dir: str = Field(
        ".runtime", description=("Where logs, the embedded stack's data and running jobs' addresses are kept.")
    )
    log_format: LogFormat = Field("auto", description=("auto: console on a terminal, JSON elsewhere."))
    bus: BusSettings = BusSettings()
    detector: DetectorSettings = DetectorSettings()
    planner: PlannerSettings = PlannerSettings()
    executor: ExecutorSettings = ExecutorSettings()
    sidecar: SidecarSettings = SidecarSettings()
    rdzv: str | None = Field(None, description="host:port of the job's rendezvous store.")
    instance: str = Field("0", description="This process's name among replicas of a service.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description=("Port of this process's Prometheus endpoint (/metrics); 0: no endpoint")
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description=("Address the metrics endpoint listens on (0.0.0.0 in a container scraped from outside)"),
    )


class AgentSettings(BaseSettings):
    """The agent's settings in a worker (FLASHRECOVERY_AGENT_...), set by its launcher."""

    model_config = SettingsConfigDict(env_prefix=AGENT_ENV_PREFIX, frozen=True, extra="ignore")

    job_id: str = Field(DEFAULT_JOB_ID, description="The job this worker belongs to.")
    node_id: str = Field("node0", description="The node (sidecar) that started this worker.")
    rank: int | None = Field(None, description="This worker's global rank; unset for a standby.")
    local_rank: int | None = Field(None, description="This worker's position on its node.")
    world_size: int = Field(1, description="The job's number of ranks.")
    generation: int = Field(
        0, description=("The job's generation when this worker started (> 0 with a rank: a cold replacement).")
    )
    rdzv: str = Field("127.0.0.1:29500", description="host:port of the job's rendezvous store.")
    socket: str | None = Field(
        None, description=("The sidecar's Unix socket; unset: no control channel (no recovery).")
    )
    standby: bool = Field(False, description="A pre-started standby, waiting for a rank.")
    fault: str | None = Field(
        None,
        description=("Fault injection for tests: kind=K,rank=R,step=S[,phase=P] (kinds and phases: agent/faults.py)."),
    )
    tp: int | None = Field(
        None, description=("The job's tensor-parallel degree as its launcher registered it (unset: not told).")
    )
    backend: Backend = Field("gloo", description="torch.distributed backend.")
    gloo_lazy: bool = Field(True, description="gloo connects pairs on first use instead of at group creation.")
    command_timeout_s: float = Field(
        600.0,
        description=("How long a paused rank waits for `recover` (or a finished rank for `stop`) before giving up."),
    )
    rebuild_timeout_s: float = Field(
        120.0, description=("Bound on building a generation's groups (every member must register in the store).")
    )
    # Ranks start over many seconds on a loaded host (measured: 6 of 8 arrived within 15 s).
    start_timeout_s: float = Field(
        300.0, description=("Bound on every rank arriving for the job's first group build (generation 0).")
    )
    # The first step is often much longer than the rest (lazy communicator set-up, compilation,
    # caches) and has no step time to scale a hang threshold from, so it is declared as a long
    # phase of this length: the detector judges it like any declared phase (hang threshold +
    # this), where before a first step that hung went unseen until the collective timeout.
    first_step_s: float = Field(
        600.0,
        gt=0,
        description=(
            "Expected length of a rank's first step (declared to the detector as a long phase): "
            "a rank that has not committed its first step within the hang threshold plus this is hung."
        ),
    )

    # A setting so that a full recovery can be A/B'd with and without windows
    # (bench/refill_ab.py --env FLASHRECOVERY_AGENT_TRANSFER_WINDOW_BYTES --arms 67108864,0).
    transfer_window_bytes: int = Field(
        TRANSFER_WINDOW_BYTES,
        ge=0,
        description=(
            "Bytes of a replica's state posted together and waited for as one in a state "
            "transfer (agent/transfer.py); 0: one tensor at a time."
        ),
    )
    # SIGUSR1 is taken (faulthandler: `kill -USR1 pid` prints the stacks).
    interrupt_signal: int = Field(
        int(signal.SIGUSR2),
        ge=0,
        le=64,
        description=(
            "Signal number the control thread sends the training thread so that a pause ends the "
            "step's compute at once (inside `agent.compute()` only; 12 = SIGUSR2 on Linux). "
            "0: off, a pause waits for the step's next collective."
        ),
    )

    @field_validator("interrupt_signal")
    @classmethod
    def _not_taken(cls, v: int) -> int:
        if v in (signal.SIGUSR1, signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(
                f"{AGENT_ENV_PREFIX}INTERRUPT_SIGNAL {v} is taken (SIGUSR1: the agent's stack dumps) or cannot be caught"
            )
        return v

    @field_validator("rdzv")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{AGENT_ENV_PREFIX}RDZV must be host:port, got {v!r}")
        return v

    @property
    def rdzv_host(self) -> str:
        return self.rdzv.rpartition(":")[0]

    @property
    def rdzv_port(self) -> int:
        return int(self.rdzv.rpartition(":")[2])


def agent_env(field: str) -> str:
    """The environment variable of one AgentSettings field (what a launcher sets)."""
    if field not in AgentSettings.model_fields:
        raise KeyError(f"AgentSettings has no field {field!r}")
    return AGENT_ENV_PREFIX + field.upper()


def env_names() -> dict[str, tuple[type[BaseModel], str]]:
    """Every environment variable a settings field accepts -> (model, field). A nested group
    is accepted whole too (FLASHRECOVERY_BUS='{"linger_ms": 1}'), and so is each of its fields,
    at any depth (FLASHRECOVERY_BUS__SECURITY__PROTOCOL)."""
    out: dict[str, tuple[type[BaseModel], str]] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, f in model.model_fields.items():
            out[prefix + name.upper()] = (model, name)
            group = f.annotation
            if isinstance(group, type) and issubclass(group, BaseModel):
                walk(prefix + name.upper() + NESTED_DELIMITER, group)

    walk(ENV_PREFIX, Settings)
    for name in AgentSettings.model_fields:
        out[agent_env(name)] = (AgentSettings, name)
    return out


def unknown_env(names: Iterable[str]) -> list[str]:
    """The FLASHRECOVERY_* names among `names` (os.environ's keys) that no settings field
    accepts and that are not in OTHER_ENV: an operator's typo is otherwise silently ignored.
    Case-insensitive, as the settings read them."""
    known = env_names().keys() | OTHER_ENV.keys()
    return sorted(n for n in names if n.upper().startswith(ENV_PREFIX) and n.upper() not in known)


class ConfigError(SystemExit):
    pass


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, or a ConfigError that names every bad field."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [
            f"  {ENV_PREFIX}{NESTED_DELIMITER.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
