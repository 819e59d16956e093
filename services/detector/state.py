"""The detector's state: what it remembers about every node, rank and open incident.

Deliberately mutable, with __slots__ and numpy columns: at 10,000 nodes x 8 ranks at 1 Hz the
detector applies 80,000 rank updates a second, and the time-driven checks (node lost, hang) run
over all nodes several times a second. Frozen records rebuilt per heartbeat would cost more than
everything else together, so the core functions take the state and hand the same object back.
Only core.py changes it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from flashrecovery.shared.schemas import Evidence, FaultClass, FaultIncident, NodeRole, RankState, RepairAction

INF = math.inf
STEP_HISTORY = 256  # steps kept for the adaptive hang threshold (recent p99 step time)
SAMPLE_RING = 4096  # rank step-time samples kept for the straggler median
SEEN_IDS = 65536  # worker-event ids remembered to drop redeliveries


class RankView:
    __slots__ = (
        "rank",
        "state",
        "step",
        "key",
        "clear_since",
        "stall_start",
        "extra",
        "hung",
        "slow",
        "degraded",
        "frozen",
    )

    def __init__(self, rank: int | None) -> None:
        self.rank = rank
        self.state = RankState.STARTING
        self.step = -1
        self.key: tuple[object, ...] = ()  # (state, long phase, generation): a change is progress
        self.clear_since = 0.0  # receive time of the last change of key
        self.stall_start = INF  # when the step last advanced; finite only for judged ranks (classify)
        self.extra = 0.0  # a declared long phase extends the hang threshold by this much
        self.hung = False  # reported hung at this stall; cleared when the step advances
        self.slow = 0  # consecutive beats slower than straggler_factor x median
        self.degraded = False
        self.frozen = False  # the sidecar saw the process stopped or traced by the OS


class NodeView:
    __slots__ = ("node_id", "idx", "seq", "last_seen", "interval", "role", "ranks", "lost", "dropped_gen")

    def __init__(self, node_id: str, idx: int) -> None:
        self.node_id = node_id
        self.idx = idx
        self.seq = -1
        self.last_seen = -INF
        self.interval = 1.0
        self.role = NodeRole.ACTIVE
        self.ranks: dict[int, RankView] = {}  # by local rank
        self.lost = False  # reported (or known) lost: not reported again until it beats
        self.dropped_gen = -1  # last old generation we logged a drop for (one line, not many)


class Incident:
    """One root cause in one generation; later evidence joins it."""

    __slots__ = (
        "id",
        "job_id",
        "generation",
        "fault_class",
        "action",
        "nodes",
        "ranks",
        "fault_time",
        "first_seen",
        "detected_at",
        "evidence",
        "symptoms",
        "confidence",
        "reason",
        "root",
        "origin",
    )

    def __init__(
        self,
        id: str,
        job_id: str,
        generation: int,
        fault_class: FaultClass,
        action: RepairAction,
        nodes: tuple[str, ...],
        ranks: tuple[int, ...],
        fault_time: float,
        first_seen: float,
        detected_at: float,
        evidence: list[Evidence],
        confidence: float,
        reason: str,
        root: bool,
    ) -> None:
        self.id = id
        self.job_id = job_id
        self.generation = generation
        self.fault_class = fault_class
        self.action = action
        self.nodes = nodes
        self.ranks = ranks
        self.fault_time = fault_time  # best estimate of when the fault happened (receive clock)
        self.first_seen = first_seen
        self.detected_at = detected_at
        self.evidence = evidence
        self.symptoms = 0
        self.confidence = confidence
        self.reason = reason
        self.root = root  # False for a communication incident with no root cause found
        self.origin: str | None = None  # producer of a peer instance's incident; None: ours

    def to_event(self, producer: str) -> FaultIncident:
        return FaultIncident(
            event_id=self.id,
            job_id=self.job_id,
            generation=self.generation,
            emitted_at=self.detected_at,
            producer=producer,
            incident_id=self.id,
            fault_class=self.fault_class,
            action=self.action,
            root_cause_nodes=self.nodes,
            root_cause_ranks=self.ranks,
            evidence=tuple(self.evidence),
            symptoms_attributed=self.symptoms,
            confidence=self.confidence,
            first_seen_at=self.first_seen,
            detected_at=self.detected_at,
            reason=self.reason,
        )


@dataclass(slots=True)
class Symptom:
    """Evidence waiting for a root cause: a communication error, or an exit that followed one."""

    t: float
    node_id: str
    rank: int | None
    generation: int
    evidence: Evidence
    is_exit: bool = False


class JobState:
    """Everything about one job. Node columns live in numpy arrays indexed by NodeView.idx so the
    periodic checks are vectorised."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.generation = 0
        self.nodes: dict[str, NodeView] = {}
        self.by_idx: list[NodeView] = []
        cap = 64
        self.last_seen = np.full(cap, -INF)
        self.lost_after = np.full(cap, INF)  # interval x misses
        self.interval = np.ones(cap)
        self.due = np.full(cap, INF)  # min over RUNNING ranks of stall_start + extra
        self.watch = np.zeros(cap, dtype=bool)  # active node with live ranks, not lost
        self.incidents: dict[str, Incident] = {}
        self.by_node: dict[tuple[int, str], Incident] = {}  # (generation, node) -> its incident
        self.roots: list[Incident] = []  # root incidents of the current generation
        # Root incidents of the generations just left (the faults whose recovery led here) and
        # when the job left them: late symptoms of a recovered fault are attributed to them.
        self.prior_roots: list[Incident] = []
        self.advanced_at = -INF  # receive time of the last generation change
        self.recovering_seen = -INF  # last beat that showed a paused or recovering rank
        self.comm_open: Incident | None = None  # the unexplained-communication incident, if any
        self.hang_held: float | None = None  # since when a hang waits for a peer's incident
        self.pending: list[Symptom] = []
        self.headers: dict[tuple[str, int | None], tuple[float, Evidence, int]] = {}
        self.comm_recent: dict[tuple[str, int | None], float] = {}
        self.step_max: dict[int, float] = {}  # step -> slowest step time reported for it
        self.samples: deque[float] = deque(maxlen=SAMPLE_RING)  # recent rank step times
        self.median = 0.0  # refreshed by tick
        self.base_threshold = 0.0  # max(hang_k x p99, hang_floor_s), refreshed by tick

    def node(self, node_id: str) -> NodeView:
        view = self.nodes.get(node_id)
        if view is None:
            idx = len(self.by_idx)
            if idx == len(self.last_seen):
                self._grow()
            view = NodeView(node_id, idx)
            self.nodes[node_id] = view
            self.by_idx.append(view)
        return view

    def _grow(self) -> None:
        cap = len(self.last_seen)
        self.last_seen = np.concatenate([self.last_seen, np.full(cap, -INF)])
        self.lost_after = np.concatenate([self.lost_after, np.full(cap, INF)])
        self.interval = np.concatenate([self.interval, np.ones(cap)])
        self.due = np.concatenate([self.due, np.full(cap, INF)])
        self.watch = np.concatenate([self.watch, np.zeros(cap, dtype=bool)])

    def note_step(self, step: int, seconds: float) -> None:
        """The slowest time reported for each recent step: the hang threshold's p99 input."""
        if step not in self.step_max and len(self.step_max) >= STEP_HISTORY:
            oldest = min(self.step_max)
            if step < oldest:
                return
            del self.step_max[oldest]
        self.step_max[step] = seconds


@dataclass
class DetectorState:
    jobs: dict[str, JobState] = field(default_factory=dict)
    seen_ids: dict[str, None] = field(default_factory=dict)  # insertion-ordered, bounded
    counters: dict[str, int] = field(default_factory=dict)

    def job(self, job_id: str) -> JobState:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobState(job_id)
        return job

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def first_time(self, event_id: str) -> bool:
        if event_id in self.seen_ids:
            return False
        self.seen_ids[event_id] = None
        if len(self.seen_ids) > SEEN_IDS:
            del self.seen_ids[next(iter(self.seen_ids))]
        return True
