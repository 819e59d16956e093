"""The detector's shared vocabulary: its configuration (`Config`), what it decides
(`Decision`) and the deterministic incident id. Pure: no I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from flashrecovery.shared.schemas import FaultClass
from flashrecovery.shared.settings import DetectorSettings

from .signatures import Catalog, load_catalog

PRIOR_GENERATIONS = 2  # generations back whose root incidents still explain late symptoms


# One source of defaults: the settings model. Building it reads no environment (a plain
# pydantic model; only shared.settings.Settings reads FLASHRECOVERY_*).
_S = DetectorSettings()
# The settings that Config carries as they are (signatures_path becomes `catalog`).
_FROM_SETTINGS = tuple(f for f in DetectorSettings.model_fields if f != "signatures_path")


@dataclass(frozen=True)
class Config:
    heartbeat_interval_s: float = _S.heartbeat_interval_s  # used when a heartbeat declares none
    heartbeat_misses: int = _S.heartbeat_misses
    hang_floor_s: float = _S.hang_floor_s
    hang_k: float = _S.hang_k
    correlation_window_s: float = _S.correlation_window_s
    straggler_factor: float = _S.straggler_factor
    straggler_consecutive: int = _S.straggler_consecutive
    catalog: Catalog | None = None
    header_settle_s: float = 0.5  # a Traceback with no exception line after this is software
    quiet_factor: float = 1.5  # a node silent for this many intervals is a suspect / not "heartbeating"
    max_evidence: int = 16  # evidence items carried by one incident
    producer: str = "detector"
    # Set by the shell while other instances own part of the job's partitions: a hang with no
    # OS-stopped process among its ranks waits this long for a peer's incident (one that names
    # the stopped process elsewhere) before it is reported here. 0: one instance sees it all.
    peer_grace_s: float = 0.0

    @classmethod
    def from_settings(cls, s: DetectorSettings, producer: str = "detector") -> Config:
        return cls(
            **{f: getattr(s, f) for f in _FROM_SETTINGS}, catalog=load_catalog(s.signatures_path), producer=producer
        )

    @property
    def long_phase_default_s(self) -> float:
        """Extension for a long phase declared without an expected duration."""
        return self.hang_k * self.hang_floor_s


@dataclass(frozen=True)
class Decision:
    """What the detector decided and why. kind: incident | degradation (event set: publish it),
    joined (evidence added to an incident already out), noted (a peer instance's incident is now
    a known root cause here) or dropped (input ignored)."""

    kind: str
    job_id: str
    generation: int
    reason: str
    event: Any = None
    incident_id: str | None = None
    fault_class: FaultClass | None = None
    node_id: str | None = None


def incident_id(
    job_id: str, generation: int, fault_class: FaultClass, nodes: tuple[str, ...], ranks: tuple[int, ...]
) -> str:
    """Deterministic: a replay or another detector instance derives the same id."""
    text = "|".join(
        (job_id, str(generation), fault_class.value, ",".join(sorted(nodes)), ",".join(str(r) for r in sorted(ranks)))
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]
