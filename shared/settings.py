"""Configuration, validated at start-up. Environment variables use the FLASHRECOVERY_ prefix;
nested groups use a double underscore (FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES=5)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSecuritySettings(BaseModel):
    """How every Kafka client of FlashRecovery authenticates and encrypts (aiokafka's options).
    The embedded broker speaks PLAINTEXT only (docs/security.md says why); production brokers
    want SASL_SSL with SCRAM-SHA-512 and one principal per service."""
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None  # CA bundle that signed the brokers' certificates
    ssl_certfile: str | None = None  # client certificate (mutual TLS), with ssl_keyfile
    ssl_keyfile: str | None = None
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    # A file holding the password (a mounted Secret), so it is in no environment listing.
    sasl_password_file: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "KafkaSecuritySettings":
        if self.protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password_file):
            raise ValueError(f"protocol {self.protocol} needs sasl_username and sasl_password_file")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        return self


class BusSettings(BaseModel):
    telemetry_partitions: int = Field(8, ge=1, le=1024)
    control_partitions: int = Field(1, ge=1, le=64)
    linger_ms: int = Field(5, ge=0, le=1000)
    max_batch_bytes: int = Field(1 << 20, ge=1024)
    handler_retries: int = Field(3, ge=0, le=20)
    topic_namespace: str = ""  # lets tests and side-by-side jobs share a broker
    security: KafkaSecuritySettings = KafkaSecuritySettings()
    # Authentication tags on incidents, plans and commands (shared/signing.py, docs/security.md):
    # a JSON key file, e.g. a mounted Secret. Set: producers sign those records and consumers
    # dead-letter any that is untagged, forged or signed with an unknown key. Unset: no tags.
    signing_key_file: str | None = None
    # False only while a deployment moves to signing: tags are added and checked, but a record
    # without one is still accepted (a forged or unknown-key tag is refused either way).
    require_signatures: bool = True

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
    replication_factor: int = Field(1, ge=1, le=16, description=(
        "Replication factor of the topics FlashRecovery creates (existing topics are left alone). "
        "1 for the embedded broker; 3 in production."))
    min_insync_replicas: int | None = Field(None, ge=1, le=16, description=(
        "Topic config min.insync.replicas of the topics created; unset: the broker's default. With "
        "producer_acks=all a write succeeds only once this many replicas have it. 2 in production."))
    producer_acks: Literal["0", "1", "all"] = Field("1", description=(
        "Producer acks: 1 = the partition leader has the record (embedded default), all = every "
        "in-sync replica has it (production)."))
    idempotence: bool = Field(False, description=(
        "Idempotent producer: a retried send is written once. Needs producer_acks=all; on in "
        "production, off for the embedded broker."))

    @model_validator(mode="after")
    def _durability(self) -> BusSettings:
        if self.idempotence and self.producer_acks != "all":
            raise ValueError("idempotence needs producer_acks=all")
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(f"min_insync_replicas {self.min_insync_replicas} exceeds replication_factor "
                             f"{self.replication_factor}: no write could ever succeed")
        return self


class DetectorSettings(BaseModel):
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_misses: int = Field(3, ge=1)
    hang_floor_s: float = Field(5.0, gt=0)
    hang_k: float = Field(10.0, gt=1)
    correlation_window_s: float = Field(3.0, gt=0)
    straggler_factor: float = Field(2.0, gt=1)
    straggler_consecutive: int = Field(5, ge=1)
    signatures_path: str | None = None  # operators' extra signature catalog (JSON)


class ExecutorSettings(BaseModel):
    phase_timeout_s: float = Field(60.0, gt=0)
    phase_retries: int = Field(2, ge=0)
    lease_ttl_s: float = Field(3.0, gt=0)
    # A plan that fails because a second fault hit it is usually followed within ~0.1 s by the
    # planner's superseding plan: wait this long for one before escalating the failure.
    supersede_grace_s: float = Field(2.0, ge=0)


class PlannerSettings(BaseModel):
    restart_in_place_for_software: bool = False
    # What to do when no spare can take a replaced node's ranks. Only "wait" (pause, escalate,
    # re-plan when capacity arrives): "shrink" needs rank renumbering and state transfers that
    # are not implemented, so it is refused here rather than driven into a broken job.
    no_spare_policy: str = "wait"
    quarantine_faults: int = Field(2, ge=1)
    quarantine_window_s: float = Field(3600.0, gt=0)

    @field_validator("no_spare_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v == "shrink":
            raise ValueError("'shrink' is not supported yet (no rank renumbering or state "
                             "transfer for a smaller world): use 'wait'")
        if v != "wait":
            raise ValueError("must be 'wait'")
        return v


class SidecarSettings(BaseModel):
    node_id: str = "node-0"
    role: str = "active"  # active | spare
    ranks: str = ""  # comma-separated global ranks hosted here, local rank = position
    world_size: int = Field(0, ge=0)
    capacity: int = Field(2, ge=0)  # ranks the node can host (its accelerators)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # Send per-rank data as columns: heartbeats' rank_columns and acks' report_columns (half the
    # bytes, ~2x cheaper to decode; what a 100k-rank job wants). Off by default: a subscriber
    # that predates the compact forms would see no ranks.
    rank_columns: bool = False
    # What every worker runs: a module (`python -m worker_module`) or a script (`python
    # worker_script`), never both; then worker_args, shell-quoted, passed unchanged.
    worker_module: str = "flashrecovery.agent.reference.train"
    worker_script: str = ""
    worker_args: str = ""
    # The node's rank among the job's nodes (torchrun's GROUP_RANK); -1: the first hosted rank
    # divided by the ranks hosted here.
    node_rank: int = Field(-1, ge=-1)
    # Sidecars sharing one machine (run --standalone registers one node per tensor-parallel
    # group): torchrun's LOCAL_RANK is local_rank_base + the position here, LOCAL_WORLD_SIZE is
    # local_world_size (0: the ranks hosted here).
    local_rank_base: int = Field(0, ge=0)
    local_world_size: int = Field(0, ge=0)
    # `flashrecovery run`: the sidecar ends with the job. It exits 0 once every rank of the job
    # has finished and its own workers are gone, and 1 as soon as one of its workers fails in a
    # way no recovery can repair (it exited before connecting to the agent: a plain script).
    exit_with_job: bool = False
    # A rank blocked rebuilding groups with a peer that died meanwhile cannot answer a pause
    # until its rebuild gives up; the pause wait must outlast that bound.
    rebuild_timeout_s: float = Field(15.0, gt=0)
    pause_timeout_s: float = Field(25.0, gt=0)
    # On a machine whose cores the control plane shares with the trainers (the local demo), a
    # positive niceness keeps heartbeats on time while torch imports saturate the CPU.
    worker_nice: int = Field(0, ge=0, le=19)
    log_lines_per_s: float = Field(20.0, gt=0)
    log_burst: int = Field(50, ge=1)

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ("active", "spare"):
            raise ValueError("must be 'active' or 'spare'")
        return v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: str) -> str:
        if v and not all(p.strip().isdigit() for p in v.split(",")):
            raise ValueError("must be comma-separated rank numbers")
        return v

    @model_validator(mode="after")
    def _one_entry_point(self) -> "SidecarSettings":
        module = self.worker_module if "worker_module" in self.model_fields_set or not self.worker_script else ""
        if bool(module) == bool(self.worker_script):
            raise ValueError("set exactly one of worker_module and worker_script "
                             f"(got module {module!r}, script {self.worker_script!r})")
        return self

    def rank_list(self) -> list[int]:
        return [int(p) for p in self.ranks.split(",") if p.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLASHRECOVERY_", env_nested_delimiter="__",
                                      extra="ignore")

    job_id: str = "demo"
    kafka_bootstrap: str | None = None  # unset: the embedded stack starts a local broker
    redis_url: str | None = None  # unset: the embedded stack starts a local redis-server
    runtime_dir: str = ".runtime"
    log_format: str = "auto"  # auto | json | console
    bus: BusSettings = BusSettings()
    detector: DetectorSettings = DetectorSettings()
    planner: PlannerSettings = PlannerSettings()
    executor: ExecutorSettings = ExecutorSettings()
    sidecar: SidecarSettings = SidecarSettings()
    rdzv: str | None = None  # host:port of the rendezvous store
    instance: str = "0"  # this process's name among replicas of a service
    metrics_port: int = Field(0, ge=0, le=65535, description=(
        "Port of this process's Prometheus endpoint (/metrics); 0: no endpoint"))
    metrics_host: str = Field("127.0.0.1", description=(
        "Address the metrics endpoint listens on (0.0.0.0 in a container scraped from outside)"))

    @field_validator("log_format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        if v not in ("auto", "json", "console"):
            raise ValueError("must be auto, json or console")
        return v


class ConfigError(SystemExit):
    pass


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, or a ConfigError that names every bad field."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [f"  FLASHRECOVERY_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                 for e in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
