"""The worker's environment, as given by its launcher (FLASHRECOVERY_*)."""

from __future__ import annotations

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLASHRECOVERY_", frozen=True, extra="ignore")

    job_id: str = "job"
    node_id: str = "node0"
    rank: int | None = None
    local_rank: int | None = None
    world_size: int = 1
    generation: int = 0
    rdzv: str = "127.0.0.1:29500"
    agent_socket: str | None = None
    standby: bool = False
    fault: str | None = None
    # The job's tensor-parallel degree as its launcher registered it (None: not told).
    tp: int | None = None
    backend: str = "gloo"
    gloo_lazy: bool = True
    # How long a paused rank waits for `recover` (or a finished rank for `stop`) before giving up.
    command_timeout_s: float = 600.0
    # Bound on building a generation's groups (every member must register in the store).
    rebuild_timeout_s: float = 120.0
    # Bound on every rank arriving for the first group build of a job (generation 0): ranks
    # start over many seconds on a loaded host (measured: 6 of 8 arrived within 15 s).
    start_timeout_s: float = 300.0

    @field_validator("rdzv")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"FLASHRECOVERY_RDZV must be host:port, got {v!r}")
        return v

    @property
    def rdzv_host(self) -> str:
        return self.rdzv.rpartition(":")[0]

    @property
    def rdzv_port(self) -> int:
        return int(self.rdzv.rpartition(":")[2])
