"""The detector's pure core: fixed timestamps, no I/O."""

from __future__ import annotations

import json

import pytest

from flashrecovery.detector import core
from flashrecovery.detector.signatures import CatalogError, load_catalog
from flashrecovery.detector.state import DetectorState
from flashrecovery.shared.schemas import (
    FaultClass,
    LogEvent,
    NodeHeartbeat,
    NodeRole,
    RankState,
    RankStatus,
    RepairAction,
    WorkerExit,
)
from flashrecovery.shared.settings import DetectorSettings

JOB = "job-u"
CATALOG = load_catalog()


def cfg(**kw) -> core.Config:
    return core.Config(catalog=CATALOG, **kw)


class Sim:
    """A small job: nodes n0..n{N-1} with R ranks each, beating at 1 Hz, step time 0.2 s."""

    def __init__(self, nodes: int = 4, ranks: int = 2, config: core.Config | None = None) -> None:
        self.cfg = config or cfg()
        self.state = DetectorState()
        self.nodes = [f"n{i}" for i in range(nodes)]
        self.r = ranks
        self.seq = {n: 0 for n in self.nodes}
        self.step = 0
        self.generation = 0
        self.decisions: list[core.Decision] = []

    def beat(
        self,
        node: str,
        now: float,
        *,
        step: int | None = None,
        since: float = 0.1,
        step_time: float = 0.2,
        state: RankState = RankState.RUNNING,
        overrides=None,
        seq: int | None = None,
        generation: int | None = None,
        extra_rows: tuple[RankStatus, ...] = (),
    ) -> list[core.Decision]:
        i = self.nodes.index(node)
        ranks = []
        for lr in range(self.r):
            rank = i * self.r + lr
            kw = dict(
                rank=rank,
                local_rank=lr,
                pid=1000 + rank,
                state=state,
                step=self.step if step is None else step,
                step_time_s=step_time,
                since_progress_s=since,
                generation=self.generation,
            )
            kw.update((overrides or {}).get(rank, {}))
            ranks.append(RankStatus(**kw))
        ranks += extra_rows
        if seq is None:
            self.seq[node] += 1
            seq = self.seq[node]
        hb = NodeHeartbeat(
            job_id=JOB,
            generation=self.generation if generation is None else generation,
            producer="sidecar",
            node_id=node,
            seq=seq,
            ranks=tuple(ranks),
        )
        return self.feed(hb, now)

    def feed(self, event, now: float) -> list[core.Decision]:
        _, ds = core.observe(self.state, event, now, self.cfg)
        self.decisions += ds
        return ds

    def tick(self, now: float) -> list[core.Decision]:
        _, ds = core.tick(self.state, now, self.cfg)
        self.decisions += ds
        return ds

    def run(self, t0: float, t1: float, *, skip=(), per_node=None, tick_every: float = 0.1) -> None:
        """Beat every node each whole second in [t0, t1) and tick in between."""
        t = t0
        while t < t1 - 1e-9:
            if abs(t - round(t)) < 1e-6:
                self.step += 5
                for n in self.nodes:
                    if n not in skip:
                        self.beat(n, t, **((per_node or {}).get(n, {})))
            self.tick(t)
            t = round(t + tick_every, 6)

    def incidents(self):
        return [d.event for d in self.decisions if d.kind == "incident"]

    def degradations(self):
        return [d.event for d in self.decisions if d.kind == "degradation"]


def exit_(
    node: str,
    rank: int | None,
    *,
    expected: bool = False,
    generation: int = 0,
    signal: int | None = 9,
    event_id: str | None = None,
) -> WorkerExit:
    kw = {"event_id": event_id} if event_id else {}
    return WorkerExit(
        job_id=JOB,
        generation=generation,
        producer="sidecar",
        node_id=node,
        rank=rank,
        pid=1000 + (rank if rank is not None else 999),
        signal=signal,
        exit_code=None if signal else 0,
        expected=expected,
        **kw,
    )


def log(node: str, rank: int | None, line: str, *, generation: int = 0, event_id: str | None = None) -> LogEvent:
    kw = {"event_id": event_id} if event_id else {}
    return LogEvent(job_id=JOB, generation=generation, producer="sidecar", node_id=node, rank=rank, line=line, **kw)


# ----------------------------------------------------------------------------- classes


def test_process_crash_is_immediate_and_names_the_node() -> None:
    sim = Sim()
    sim.run(0, 3)
    ds = sim.feed(exit_("n2", 5), 3.05)
    [inc] = [d.event for d in ds if d.kind == "incident"]
    assert inc.fault_class is FaultClass.PROCESS_CRASH
    assert inc.action is RepairAction.RESTART_PROCESS
    assert inc.root_cause_nodes == ("n2",) and inc.root_cause_ranks == (5,)
    assert inc.detected_at - inc.first_seen_at < 1.0


def test_expected_exit_is_not_a_fault() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n2", 5, expected=True, signal=None), 3.05)
    sim.run(3.1, 6)
    assert sim.incidents() == []


def test_a_standby_dying_is_not_a_fault_of_its_node() -> None:
    """A standby holds no rank (its sidecar starts another); an incident naming no rank would
    restart every rank of the active node that kept it (issue #14 item 1: standbys on every node)."""
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n2", None), 3.05)
    sim.run(3.1, 6)
    assert sim.incidents() == []
    sim.feed(exit_("n2", 5), 6.05)  # a rank of that node still is
    assert [i.root_cause_ranks for i in sim.incidents()] == [(5,)]


@pytest.mark.parametrize(
    "line, fault_class, action",
    [
        (
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=4242, GPU has fallen off the bus.",
            FaultClass.HARDWARE,
            RepairAction.REPLACE_NODE,
        ),
        ("NVRM: Xid (PCI:0000:3b:00): 48, pid=1, DBE", FaultClass.HARDWARE, RepairAction.REPLACE_NODE),
        ("kernel: uncorrectable ECC error detected on GPU 3", FaultClass.HARDWARE, RepairAction.REPLACE_NODE),
        (
            "RuntimeError: CUDA error: an illegal memory access was encountered",
            FaultClass.HARDWARE,
            RepairAction.REPLACE_NODE,
        ),
        ("RuntimeError: CUDA error: unspecified launch failure", FaultClass.HARDWARE, RepairAction.REPLACE_NODE),
        ("NVLink: fatal error detected on link 2", FaultClass.HARDWARE, RepairAction.REPLACE_NODE),
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
            FaultClass.OUT_OF_MEMORY,
            RepairAction.RESTART_PROCESS,
        ),
        ("RuntimeError: shape mismatch in layer 3", FaultClass.SOFTWARE, RepairAction.RESTART_PROCESS),
        ("KeyError: 'missing batch key'", FaultClass.SOFTWARE, RepairAction.RESTART_PROCESS),
    ],
)
def test_log_signatures_classify_at_once(line: str, fault_class: FaultClass, action: RepairAction) -> None:
    sim = Sim()
    sim.run(0, 2)
    ds = sim.feed(log("n1", 3, line), 2.3)
    [inc] = [d.event for d in ds if d.kind == "incident"]
    assert (inc.fault_class, inc.action, inc.root_cause_nodes) == (fault_class, action, ("n1",))


@pytest.mark.parametrize(
    "line", ["step 100 loss 2.31", "Epoch 3 error rate 0.1 (val)", "NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception"]
)
def test_ordinary_lines_are_not_faults(line: str) -> None:
    sim = Sim()
    sim.run(0, 2)
    sim.feed(log("n1", 3, line), 2.3)
    sim.run(2.4, 8)
    assert sim.incidents() == []


def test_traceback_waits_for_its_exception_line() -> None:
    sim = Sim()
    sim.run(0, 2)
    assert sim.feed(log("n1", 2, "Traceback (most recent call last):"), 2.0) == []
    sim.feed(log("n1", 2, '  File "train.py", line 10, in <module>'), 2.01)
    ds = sim.feed(log("n1", 2, "torch.OutOfMemoryError: CUDA out of memory."), 2.02)
    [inc] = [d.event for d in ds if d.kind == "incident"]
    assert inc.fault_class is FaultClass.OUT_OF_MEMORY
    assert inc.first_seen_at == 2.0
    sim.run(2.1, 5)
    assert len(sim.incidents()) == 1


def test_traceback_alone_settles_as_software() -> None:
    sim = Sim()
    sim.run(0, 2)
    sim.feed(log("n1", 2, "Traceback (most recent call last):"), 2.05)
    sim.tick(2.3)
    assert sim.incidents() == []
    sim.tick(2.6)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.SOFTWARE and inc.detected_at - inc.first_seen_at < 1.0


def test_node_lost_after_misses() -> None:
    sim = Sim()
    sim.run(0, 5)
    sim.run(5, 12, skip={"n3"})  # n3's last beat at t=4
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.NODE_LOST and inc.action is RepairAction.REPLACE_NODE
    assert inc.root_cause_nodes == ("n3",) and inc.root_cause_ranks == (6, 7)
    assert 4 + 3 < inc.detected_at <= 4 + 3 + 0.2


def test_lost_node_is_not_reported_again_and_counts_again_after_return() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.run(3, 20, skip={"n3"})
    assert len(sim.incidents()) == 1
    sim.run(20, 25)  # back
    sim.run(25, 30, skip={"n3"})
    assert len(sim.incidents()) == 1  # same generation, same node: joins the first


def test_node_with_only_finished_ranks_going_away_is_not_lost() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.beat("n3", 3.0, state=RankState.DONE)
    sim.run(4, 10, skip={"n3"})
    assert sim.incidents() == []


def test_spare_node_going_quiet_is_not_a_training_fault() -> None:
    sim = Sim(nodes=1)
    hb = NodeHeartbeat(
        job_id=JOB,
        generation=0,
        producer="s",
        node_id="spare0",
        seq=1,
        role=NodeRole.SPARE,
        ranks=(RankStatus(rank=None, local_rank=0, pid=1, state=RankState.STANDBY),),
    )
    sim.feed(hb, 0.0)
    for t in range(1, 10):
        sim.beat("n0", float(t))
        sim.tick(t + 0.5)
    assert sim.incidents() == []


# ----------------------------------------------------------------------------- hang


def test_hang_fires_at_floor_threshold_plus_tick() -> None:
    sim = Sim()
    sim.run(0, 4)
    # rank 4 (n2) stops advancing at t=4: its sidecar reports growing since_progress
    t = 4.0
    hung_at = None
    while t < 15 and hung_at is None:
        if abs(t - round(t)) < 1e-6:
            sim.step += 5
            for n in sim.nodes:
                if n == "n2":
                    sim.beat(n, t, overrides={4: dict(step=sim.step - (t - 3) * 5, since_progress_s=t - 4 + 0.1)})
                else:
                    sim.beat(n, t)
        if any(d.kind == "incident" for d in sim.tick(t)):
            hung_at = t
        t = round(t + 0.1, 6)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.HANG and inc.root_cause_ranks == (4,)
    assert inc.root_cause_nodes == ("n2",)
    stall_start = 3.9  # t=4 beat with since_progress 0.1
    assert stall_start + 5.0 < hung_at <= stall_start + 5.0 + 0.2  # floor 5 s dominates 10 x 0.2 s


def test_hang_threshold_adapts_to_p99_step_time() -> None:
    sim = Sim()
    sim.run(0, 5, per_node={n: dict(step_time=2.0) for n in sim.nodes})  # p99 2 s -> threshold 20 s
    stuck = {"overrides": {0: dict(step=sim.step, since_progress_s=0.0)}}
    for k in range(1, 25):
        t = 5.0 + k
        sim.step += 1
        for n in sim.nodes:
            if n == "n0":
                sim.beat(n, t, step_time=2.0, overrides={0: dict(step=5, since_progress_s=float(k))})
            else:
                sim.beat(n, t, step_time=2.0)
        sim.tick(t + 0.5)
        if k < 20:
            assert sim.incidents() == [], k
    assert stuck
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.HANG and inc.root_cause_ranks == (0,)
    assert "threshold 20.00s" in inc.reason


def test_declared_long_phase_extends_the_threshold() -> None:
    sim = Sim(nodes=2)
    sim.run(0, 3)
    frozen = sim.step
    # every rank enters a 30 s checkpoint phase: steps stop for 20 s, no incident
    for k in range(1, 21):
        t = 3.0 + k
        for n in sim.nodes:
            sim.beat(
                n,
                t,
                step=frozen,
                since=float(k),
                overrides={r: dict(long_phase="checkpoint", long_phase_expected_s=30.0) for r in range(4)},
            )
        sim.tick(t + 0.5)
    assert sim.incidents() == []
    # the phase ends and training resumes: the stall clock restarts, no incident
    sim.run(24, 30)
    assert sim.incidents() == []


def test_long_phase_that_overruns_is_a_hang() -> None:
    sim = Sim(nodes=1)
    sim.run(0, 3)
    frozen = sim.step
    for k in range(1, 20):
        t = 3.0 + k
        sim.beat(
            "n0", t, step=frozen, since=float(k), overrides={0: dict(long_phase="eval", long_phase_expected_s=10.0)}
        )
        sim.tick(t + 0.5)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.HANG
    # rank 1 (not in the phase) crossed 5 s first; rank 0 only after 10 + 5 s: both reported once
    assert inc.root_cause_ranks == (1,)


def _starting_job(seconds: int, first_step: dict | None, stopped: int | None = None) -> tuple[Sim, list[float]]:
    """4 ranks that never commit: `starting` at step 0 for `seconds` beats, every rank inside the
    declared first-step phase when `first_step` is given (its row fields), `stopped` OS-stopped.
    Returns the simulator and the times at which incidents came out."""
    sim = Sim(nodes=2)
    fired = []
    for k in range(seconds):
        t = float(k)
        for n in sim.nodes:
            over = {r: dict(first_step or {}) for r in range(4)}
            if stopped is not None:
                over[stopped]["proc_state"] = "T"
            sim.beat(n, t, step=0, since=float(k) + 0.1, step_time=0.0, state=RankState.STARTING, overrides=over)
        if any(d.kind == "incident" for d in sim.tick(t + 0.5)):
            fired.append(t + 0.5)
    return sim, fired


def test_starting_ranks_outside_a_declared_phase_are_not_judged() -> None:
    # Importing torch, waiting for peers: bounded by the agent's start timeout, not by the
    # detector (a 60 s start is no hang).
    sim, _ = _starting_job(60, None, stopped=2)
    assert sim.incidents() == []


def test_first_step_that_overruns_its_declared_phase_is_a_hang_naming_the_stopped_rank() -> None:
    """The agent declares its first step (agent settings first_step_s); a rank stopped inside it,
    with every rank still `starting` (nothing committed), is reported once the hang threshold
    (the 5 s floor: no step times yet) plus the declared 10 s have passed, not before."""
    phase = dict(long_phase="first_step", long_phase_expected_s=10.0)
    sim, fired = _starting_job(25, phase, stopped=2)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.HANG and inc.root_cause_ranks == (2,)
    assert inc.action is RepairAction.RESTART_PROCESS
    assert 15.0 < fired[0] <= 16.5, fired  # stall clock from the first beat (since 0.1 s)
    assert "first_step" in inc.reason and "(10s)" in inc.reason, inc.reason


@pytest.mark.parametrize("state", [RankState.PAUSED, RankState.RECOVERING, RankState.STANDBY, RankState.DONE])
def test_ranks_not_running_are_never_hung(state: RankState) -> None:
    sim = Sim(nodes=1)
    sim.run(0, 2)
    for k in range(1, 30):
        sim.beat("n0", 2.0 + k, state=state, since=float(k))
        sim.tick(2.5 + k)
    assert sim.incidents() == []


def test_running_after_pause_restarts_the_stall_clock() -> None:
    """A sidecar's since_progress keeps counting through a pause; the detector must not call the
    first RUNNING beat after a 60 s pause a hang."""
    sim = Sim(nodes=1)
    sim.run(0, 2)
    for k in range(1, 60):
        sim.beat("n0", 2.0 + k, state=RankState.PAUSED, since=float(k))
        sim.tick(2.5 + k)
    sim.beat("n0", 62.0, since=60.0)
    sim.tick(62.5)
    sim.beat("n0", 63.0, since=0.1)
    sim.tick(63.5)
    assert sim.incidents() == []


def test_job_wide_stall_is_one_incident_naming_the_lagging_rank() -> None:
    sim = Sim()
    sim.run(0, 3)
    base = sim.step
    for k in range(1, 12):
        t = 3.0 + k
        for n in sim.nodes:
            # rank 6 is one step behind: everybody else waits for it in the collective
            sim.beat(n, t, step=base, since=float(k), overrides={6: dict(step=base - 1)})
        sim.tick(t + 0.5)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.HANG
    assert inc.root_cause_nodes == ("n3",) and inc.root_cause_ranks == (6,)
    assert inc.symptoms_attributed == 7


# ----------------------------------------------------------------------------- straggler


def test_straggler_degradation_after_consecutive_slow_beats() -> None:
    sim = Sim()
    sim.run(0, 3)
    for k in range(7):
        t = 3.0 + k
        sim.step += 1
        for n in sim.nodes:
            sim.beat(n, t, overrides={3: dict(step_time_s=0.9)} if n == "n1" else None)
        sim.tick(t + 0.5)
    [deg] = sim.degradations()
    assert (deg.node_id, deg.rank, deg.consecutive) == ("n1", 3, 5)
    assert deg.median_step_time_s == pytest.approx(0.2)
    assert sim.incidents() == []


def test_one_slow_step_is_not_a_straggler() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.run(3, 4, per_node={"n1": dict(overrides={3: dict(step_time_s=3.0)})})
    sim.run(4, 12)
    assert sim.degradations() == [] and sim.incidents() == []


# ----------------------------------------------------------------------------- root cause


def test_crash_with_peer_symptoms_is_one_incident() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n0", 0), 3.0)
    for rank in range(1, 8):
        sim.feed(
            log(f"n{rank // 2}", rank, "RuntimeError: [gloo] Connection closed by peer [10.0.0.1]:29500"),
            3.0 + 0.01 * rank,
        )
    sim.run(3.1, 10)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.PROCESS_CRASH and inc.root_cause_nodes == ("n0",)
    root = sim.state.jobs[JOB].incidents[inc.incident_id]
    assert root.symptoms == 7


def test_symptoms_before_the_root_are_counted_in_it() -> None:
    sim = Sim()
    sim.run(0, 3)
    for rank in range(2, 8):
        sim.feed(log(f"n{rank // 2}", rank, "Connection reset by peer"), 3.0)
    sim.tick(3.1)
    ds = sim.feed(exit_("n0", 0), 3.5)  # the exit report arrives after the symptoms
    [inc] = [d.event for d in ds if d.kind == "incident"]
    assert inc.symptoms_attributed == 6
    sim.run(4, 10)
    assert len(sim.incidents()) == 1


def test_symptoms_of_a_lost_node_wait_for_it() -> None:
    sim = Sim()
    sim.run(0, 5)  # n3 beats last at t=4 and dies at 4.5
    for rank in range(0, 6):
        sim.feed(log(f"n{rank // 2}", rank, "NCCL error: remote process exited or there was a network error"), 4.6)
    sim.run(5, 12, skip={"n3"})
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.NODE_LOST and inc.root_cause_nodes == ("n3",)
    assert inc.symptoms_attributed == 6


def test_secondary_exit_after_comm_error_is_a_symptom() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n0", 0), 3.0)
    sim.feed(log("n1", 2, "Connection closed by peer"), 3.01)
    sim.feed(exit_("n1", 2, signal=None), 3.2)  # the survivor died of the broken collective
    sim.run(3.3, 10)
    root, dead = sim.incidents()
    assert root.root_cause_nodes == ("n0",)
    assert sim.state.jobs[JOB].incidents[root.incident_id].symptoms >= 1  # attributed to the root
    # ... but its process is gone: restarted too (issue #12 item 7), with the lower confidence
    assert (dead.root_cause_nodes, dead.root_cause_ranks, dead.fault_class) == (("n1",), (2,), FaultClass.PROCESS_CRASH)
    assert dead.confidence == 0.6 and "symptom of process_crash on n0" in dead.reason


def test_unexplained_comm_errors_give_one_low_confidence_incident_without_action() -> None:
    sim = Sim()
    sim.run(0, 3)
    for rank in (1, 2, 5):
        sim.feed(log(f"n{rank // 2}", rank, "NCCL WARN timeout waiting for peer"), 3.0)
    sim.run(3.1, 6)
    assert sim.incidents() == []  # still inside the window
    sim.run(6, 8)
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.COMMUNICATION and inc.action is RepairAction.NONE
    assert inc.confidence < 0.5 and inc.reason
    sim.feed(log("n0", 0, "NCCL WARN timeout waiting for peer"), 8.5)
    sim.run(8.6, 14)
    assert len(sim.incidents()) == 1  # later ones join it


def test_independent_faults_at_once_are_separate_incidents() -> None:
    sim = Sim()
    sim.run(0, 5)
    sim.feed(exit_("n0", 1), 5.0)
    sim.feed(log("n2", 4, "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus"), 5.0)
    sim.run(5, 12, skip={"n3"})
    got = {(i.fault_class, i.root_cause_nodes) for i in sim.incidents()}
    assert got == {(FaultClass.PROCESS_CRASH, ("n0",)), (FaultClass.HARDWARE, ("n2",)), (FaultClass.NODE_LOST, ("n3",))}


def test_later_evidence_from_a_reported_node_joins_its_incident() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n1", 2), 3.0)
    sim.feed(log("n1", 3, "RuntimeError: CUDA error: an illegal memory access was encountered"), 3.2)
    sim.run(4, 12, skip={"n1"})
    [inc] = sim.incidents()
    assert inc.fault_class is FaultClass.PROCESS_CRASH
    assert sum(d.kind == "joined" for d in sim.decisions) >= 2


# ----------------------------------------------------------------------------- robustness


def test_incident_ids_are_deterministic_across_instances_and_replays() -> None:
    ids = []
    for _ in range(2):
        sim = Sim()
        sim.run(0, 3)
        sim.feed(exit_("n2", 4), 3.3)
        ids.append(sim.incidents()[0].incident_id)
    assert ids[0] == ids[1] == core.incident_id(JOB, 0, FaultClass.PROCESS_CRASH, ("n2",), (4,))
    assert core.incident_id(JOB, 1, FaultClass.PROCESS_CRASH, ("n2",), (4,)) != ids[0]


def test_duplicate_events_do_not_double_count() -> None:
    sim = Sim()
    sim.run(0, 3)
    crash = exit_("n0", 0, event_id="e-crash")
    sym = log("n1", 2, "Connection closed by peer", event_id="e-sym")
    for _ in range(3):
        sim.feed(crash, 3.0)
        sim.feed(sym, 3.01)
    sim.run(3.1, 8)
    [inc] = sim.incidents()
    assert sim.state.jobs[JOB].incidents[inc.incident_id].symptoms == 1


def test_reordered_and_duplicated_heartbeats_are_dropped() -> None:
    sim = Sim(nodes=1)
    sim.beat("n0", 0.0, seq=5, step=50)
    sim.beat("n0", 0.5, seq=4, step=40, since=100.0)  # older beat arriving late
    sim.beat("n0", 0.6, seq=5, step=50, since=100.0)  # duplicate
    node = sim.state.jobs[JOB].nodes["n0"]
    assert node.seq == 5 and node.last_seen == 0.0 and node.ranks[0].step == 50
    assert sim.state.counters["stale_heartbeats"] == 2


def test_restarted_sidecar_with_new_counter_is_accepted() -> None:
    sim = Sim(nodes=1)
    sim.beat("n0", 0.0, seq=500)
    sim.beat("n0", 2.5, seq=1)
    assert sim.state.jobs[JOB].nodes["n0"].last_seen == 2.5


def test_sender_clock_skew_is_irrelevant() -> None:
    sim = Sim(nodes=2)
    for t in range(6):
        for n in sim.nodes:
            hb = NodeHeartbeat(
                job_id=JOB,
                generation=0,
                producer="s",
                node_id=n,
                seq=t + 1,
                emitted_at=1e9 if n == "n0" else 0.0,  # wildly wrong clocks
                ranks=(
                    RankStatus(
                        rank=0,
                        local_rank=0,
                        pid=1,
                        state=RankState.RUNNING,
                        step=t,
                        step_time_s=0.2,
                        since_progress_s=0.1,
                    ),
                ),
            )
            sim.feed(hb, float(t))
        sim.tick(t + 0.5)
    assert sim.incidents() == []


def test_old_generation_heartbeats_are_dropped_but_keep_the_node_alive() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.generation = 1
    sim.run(3, 5, skip={"n3"})
    # n3's sidecar lags: keeps beating with generation 0 and a stale, stalled rank view
    for k in range(5, 20):
        for n in sim.nodes:
            if n == "n3":
                sim.beat(n, float(k), generation=0, since=float(k))
            else:
                sim.beat(n, float(k))
        sim.tick(k + 0.5)
    assert sim.incidents() == []
    assert sim.state.counters["old_generation_heartbeats"] == 15
    assert sum(d.kind == "dropped" and "old generation" in d.reason for d in sim.decisions) == 1


def test_new_generation_means_new_incidents_and_old_evidence_joins_old_ones() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n1", 2), 3.0)
    sim.generation = 1
    sim.run(4, 6)
    late = sim.feed(exit_("n1", 2, generation=0, event_id="again"), 6.1)  # late report from generation 0
    assert [d.kind for d in late] == ["joined"]
    sim.feed(exit_("n1", 2, generation=1), 6.5)
    incs = sim.incidents()
    assert [(i.generation, i.root_cause_nodes) for i in incs] == [(0, ("n1",)), (1, ("n1",))]
    assert incs[0].incident_id != incs[1].incident_id


def test_unknown_event_kinds_are_ignored() -> None:
    sim = Sim()
    from flashrecovery.shared.schemas import Escalation

    sim.feed(Escalation(job_id=JOB, generation=0, producer="x", incident_ids=(), reason="r"), 1.0)
    assert sim.decisions == []


# ----------------------------------------------------------------------------- catalog


def test_operator_catalog_is_merged(tmp_path) -> None:
    extra = tmp_path / "site.json"
    extra.write_text(
        json.dumps(
            {
                "signatures": [
                    {
                        "id": "site-ib-down",
                        "regex": "mlx5_core .* link down",
                        "class": "communication",
                        "severity": "warning",
                        "action": "none",
                    },
                    {
                        "id": "hw-xid",
                        "regex": "\\bXid\\b.*\\b(48|79)\\b",
                        "class": "hardware",
                        "severity": "critical",
                        "action": "replace_node",
                    },
                ]
            }
        )
    )
    catalog = load_catalog(str(extra))
    assert catalog.match("mlx5_core 0000:3b:00.0 port 1 link down").id == "site-ib-down"
    assert catalog.match("NVRM: Xid (PCI:0000:3b:00): 94, ...") is None  # overridden by id
    c = core.Config.from_settings(DetectorSettings(signatures_path=str(extra)))
    assert len(c.catalog) == len(CATALOG) + 1


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"id": "x", "regex": "(", "class": "hardware", "action": "none"}, "regex"),
        ({"id": "x", "regex": "a", "class": "hang", "action": "none"}, "class"),
        ({"id": "x", "regex": "a", "class": "hardware", "action": "reboot"}, "action"),
        ({"id": "x", "regex": "a", "class": "hardware", "action": "none", "severity": "meh"}, "severity"),
    ],
)
def test_bad_catalog_entries_name_the_field(tmp_path, entry, field) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([entry]))
    with pytest.raises(CatalogError, match=f"\\(x\\): '{field}'"):
        load_catalog(str(p))


def test_released_nodes_are_not_reported_lost_and_are_learnt_again() -> None:
    """After a rebalance another instance owns n2 and n3: their silence here means nothing."""
    sim = Sim()
    sim.run(0, 3)
    released = core.release_nodes(sim.state, keep=lambda node: node in ("n0", "n1"))
    assert released == 2
    sim.run(3, 10, skip={"n2", "n3"})
    assert sim.incidents() == []
    # n3 comes back to this instance (its sidecar's seq continues): learnt again, then lost
    sim.run(10, 12, skip={"n2"})
    sim.run(12, 18, skip={"n2", "n3"})
    [inc] = sim.incidents()
    assert (inc.fault_class, inc.root_cause_nodes) == (FaultClass.NODE_LOST, ("n3",))


def _stall_with_rank_5_stopped(extra_rows_n2: tuple[RankStatus, ...] = ()):
    """Every rank stalls at one step from t = 4 s; n2's rank 5 is SIGSTOPped (its sidecar reads
    the OS state "T"). Returns the single incident."""
    sim = Sim()
    sim.run(0, 4)
    frozen_step = sim.step
    t = 4.0
    while t < 15 and not sim.incidents():
        if abs(t - round(t)) < 1e-6:
            for n in sim.nodes:
                over = {r: dict(step=frozen_step, since_progress_s=t - 4 + 0.1) for r in range(8)}
                over[5]["proc_state"] = "T"
                sim.beat(n, t, overrides=over, extra_rows=extra_rows_n2 if n == "n2" else ())
        sim.tick(t)
        t = round(t + 0.1, 6)
    [inc] = sim.incidents()
    return inc


def test_job_wide_stall_names_the_stopped_process_not_its_blocked_peers() -> None:
    """SIGSTOP on one rank: every rank stalls at the same step; only the sidecar's reading of
    the OS process state tells the frozen one from those blocked in a collective with it."""
    inc = _stall_with_rank_5_stopped()
    assert inc.fault_class is FaultClass.HANG
    assert inc.root_cause_ranks == (5,) and inc.root_cause_nodes == ("n2",)
    assert inc.confidence == 1.0


def test_a_standby_row_on_its_ranks_local_rank_does_not_hide_the_stopped_rank() -> None:
    """A heartbeat's standby row (no rank) sharing a rank's local rank must not replace that
    rank in the detector's view: it hid a SIGSTOPped rank, and its blocked peers were blamed
    (seen in e2e once active nodes kept standbys; the sidecar now gives standbys free local
    ranks, and a forged heartbeat must not be able to do the same)."""
    standby = RankStatus(rank=None, local_rank=1, pid=4242, state=RankState.STANDBY, step=0, generation=0)
    inc = _stall_with_rank_5_stopped((standby,))
    assert inc.fault_class is FaultClass.HANG
    assert inc.root_cause_ranks == (5,) and inc.root_cause_nodes == ("n2",)


# ----------------------------------------------------------------------------- peer instances
# Two instances of one consumer group: A owns n0's partition, B owns n1..n7 (one rank per node).
# A's incident reaches B through the incidents topic; here it is handed over at a chosen time.

PEER = "RuntimeError: [gloo] Connection closed by peer [10.0.0.1]:29500"


def two_instances(generation: int = 0) -> tuple[Sim, Sim]:
    a = Sim(nodes=8, ranks=1, config=cfg(producer="detector/a"))
    b = Sim(nodes=8, ranks=1, config=cfg(producer="detector/b"))
    for sim in (a, b):
        sim.generation = generation
    a.run(0, 3, skip=set(a.nodes) - {"n0"})
    b.run(0, 3, skip={"n0"})
    return a, b


def crash_at_a(a: Sim, t: float, generation: int = 0):
    [inc] = [d.event for d in a.feed(exit_("n0", 0, generation=generation), t) if d.kind == "incident"]
    return inc


def peer(sim: Sim, incident, now: float) -> list[core.Decision]:
    _, ds = core.observe_incident(sim.state, incident, now, sim.cfg)
    sim.decisions += ds
    return ds


def symptoms_at_b(b: Sim, t: float, generation: int = 0) -> None:
    for rank in range(1, 8):
        b.feed(log(f"n{rank}", rank, PEER, generation=generation), t + 0.01 * rank)


def test_peer_root_incident_explains_symptoms_held_here() -> None:
    a, b = two_instances()
    symptoms_at_b(b, 3.0)
    b.tick(3.1)
    inc = crash_at_a(a, 3.0)
    ds = peer(b, inc, 3.25)  # within the correlation window
    assert [d.kind for d in ds].count("joined") == 7 and ds[-1].kind == "noted"
    b.run(3.3, 12, skip={"n0"})
    assert b.incidents() == []
    mirror = b.state.jobs[JOB].incidents[inc.incident_id]
    assert mirror.symptoms == 7 and mirror.origin == "detector/a"
    assert b.state.jobs[JOB].pending == []


def test_peer_root_incident_before_the_symptoms_absorbs_them_on_arrival() -> None:
    a, b = two_instances()
    peer(b, crash_at_a(a, 3.0), 3.1)
    symptoms_at_b(b, 3.2)
    b.run(3.3, 12, skip={"n0"})
    assert b.incidents() == []
    assert sum(d.kind == "joined" for d in b.decisions) == 7


def test_without_the_peer_incident_symptoms_are_reported_as_today() -> None:
    a, b = two_instances()
    crash_at_a(a, 3.0)  # published by A, never read by B
    symptoms_at_b(b, 3.0)
    b.run(3.1, 12, skip={"n0"})
    [inc] = b.incidents()
    assert inc.fault_class is FaultClass.COMMUNICATION and inc.action is RepairAction.NONE
    assert inc.confidence < 0.5


def test_peer_incident_that_arrives_after_the_window_changes_nothing_sent() -> None:
    a, b = two_instances()
    symptoms_at_b(b, 3.0)
    b.run(3.1, 9, skip={"n0"})
    [comm] = b.incidents()
    peer(b, crash_at_a(a, 3.0), 9.0)  # too late: the communication incident is out
    b.run(9, 12, skip={"n0"})
    assert b.incidents() == [comm]


def test_peer_incident_of_an_older_generation_is_ignored() -> None:
    a, b = two_instances(generation=1)
    symptoms_at_b(b, 3.0, generation=1)
    old = crash_at_a(Sim(nodes=8, ranks=1, config=cfg(producer="detector/a")), 3.0, generation=0)
    ds = peer(b, old, 3.2)
    assert [d.kind for d in ds] == ["dropped"]
    assert b.state.counters["old_generation_incidents"] == 1
    b.run(3.3, 12, skip={"n0"})
    [inc] = b.incidents()
    assert inc.fault_class is FaultClass.COMMUNICATION and inc.generation == 1


def test_duplicated_peer_incident_has_no_effect() -> None:
    a, b = two_instances()
    symptoms_at_b(b, 3.0)
    inc = crash_at_a(a, 3.0)
    peer(b, inc, 3.2)
    mirror = b.state.jobs[JOB].incidents[inc.incident_id]
    before = (mirror.symptoms, len(mirror.evidence), len(b.state.jobs[JOB].roots))
    for t in (3.3, 4.0):
        assert peer(b, inc, t) == []
    assert (mirror.symptoms, len(mirror.evidence), len(b.state.jobs[JOB].roots)) == before
    assert b.state.counters["duplicate_incidents"] == 2
    b.run(3.3, 12, skip={"n0"})
    assert b.incidents() == []


def test_own_incidents_read_back_are_ignored() -> None:
    _, b = two_instances()
    [own] = [d.event for d in b.feed(exit_("n3", 3), 3.0) if d.kind == "incident"]
    job = b.state.jobs[JOB]
    before = (dict(job.incidents), list(job.roots))
    assert peer(b, own, 3.1) == []
    assert (dict(job.incidents), list(job.roots)) == before
    assert b.state.counters["own_incidents"] == 1


def test_peer_node_lost_fault_time_is_arrival_less_its_detection_time() -> None:
    """A's node-lost incident says it took ~3 s from the last beat to detection (A's clock);
    B places the fault 3 s before the incident reached it, so a symptom from just after the
    node died, held here, is explained by it."""
    a, b = two_instances()
    a.run(3, 8, skip=set(a.nodes))  # n0 beat last at t=2 and stays silent: lost at ~5.1
    [lost] = a.incidents()
    assert lost.fault_class is FaultClass.NODE_LOST
    b.feed(log("n5", 5, PEER), 2.5)
    b.run(3, 5.2, skip={"n0"})
    peer(b, lost, 5.2)
    mirror = b.state.jobs[JOB].incidents[lost.incident_id]
    assert abs(mirror.fault_time - (5.2 - (lost.detected_at - lost.first_seen_at))) < 1e-9
    b.run(5.2, 12, skip={"n0"})
    assert b.incidents() == [] and mirror.symptoms == 1


def test_peer_incident_of_a_newer_generation_explains_symptoms_once_we_get_there() -> None:
    a, b = two_instances()
    inc = crash_at_a(two_instances(generation=1)[0], 3.0, generation=1)
    ds = peer(b, inc, 3.1)  # B has not seen generation 1 yet: kept, nothing held matches
    assert [d.kind for d in ds] == ["noted"]
    b.generation = 1
    b.run(3, 4, skip={"n0"})
    symptoms_at_b(b, 4.0, generation=1)
    b.run(4.1, 12, skip={"n0"})
    assert b.incidents() == []
    assert b.state.jobs[JOB].incidents[inc.incident_id].symptoms == 7


def test_peer_communication_incident_is_joined_not_repeated() -> None:
    a, b = two_instances()
    a.feed(log("n0", 0, "NCCL WARN timeout waiting for peer"), 3.0)  # unexplained at A
    a.run(3.1, 7, skip=set(a.nodes) - {"n0"})
    [comm] = a.incidents()
    b.run(3, 7, skip={"n0"})
    peer(b, comm, 7.0)
    b.feed(log("n5", 5, "NCCL WARN timeout waiting for peer"), 7.5)
    b.run(7.6, 14, skip={"n0"})
    assert b.incidents() == []
    assert b.state.jobs[JOB].incidents[comm.incident_id].symptoms == comm.symptoms_attributed + 1


# ----------------------------------------------------------------------------- rebalance handover


def test_node_that_died_before_the_handover_is_seeded_and_reported_lost() -> None:
    """n0 beat last at t=2 to the instance that owned its partition; at t=3 the partition moves
    here. This instance never heard of n0: the registry names it, and it is lost after the
    usual misses counted from the handover."""
    sim = Sim(nodes=4, ranks=2)
    sim.run(0, 3, skip={"n0"})
    seeded = core.expect_nodes(sim.state, JOB, [("n0", ((0, 0), (1, 1))), ("n1", ((2, 0), (3, 1)))], 3.0, sim.cfg)
    assert seeded == 1  # n1 is already known here: left alone
    sim.run(3, 5.9, skip={"n0"})
    assert sim.incidents() == []
    sim.run(5.9, 8, skip={"n0"})
    [inc] = sim.incidents()
    assert (inc.fault_class, inc.root_cause_nodes, inc.root_cause_ranks) == (FaultClass.NODE_LOST, ("n0",), (0, 1))
    assert 3.0 + 3 * 1.0 <= inc.detected_at <= 3.0 + 3 * 1.0 + 0.2
    assert "never heard here" in inc.evidence[0].detail


def test_seeded_node_that_beats_is_an_ordinary_node() -> None:
    sim = Sim(nodes=4, ranks=2)
    sim.run(0, 3, skip={"n0"})
    assert core.expect_nodes(sim.state, JOB, [("n0", ((0, 0), (1, 1)))], 3.0, sim.cfg) == 1
    sim.run(3, 12)
    assert sim.incidents() == []
    assert sim.state.jobs[JOB].nodes["n0"].seq > 0


def test_no_seeding_while_the_job_is_not_heard_and_nodes_without_ranks_are_skipped() -> None:
    sim = Sim(nodes=4, ranks=2)
    assert core.expect_nodes(sim.state, JOB, [("n0", ((0, 0),))], 0.0, sim.cfg) is None
    sim.run(0, 3, skip={"n0", "n3"})
    # a finished job: nobody beat for a while
    assert core.expect_nodes(sim.state, JOB, [("n0", ((0, 0),))], 10.0, sim.cfg) is None
    assert core.expect_nodes(sim.state, JOB, [("n0", ()), ("n3", ((6, 0),))], 3.0, sim.cfg) == 1
    assert "n0" not in sim.state.jobs[JOB].nodes


def test_seeded_node_whose_partition_moves_away_again_is_released() -> None:
    sim = Sim(nodes=4, ranks=2)
    sim.run(0, 3, skip={"n0"})
    core.expect_nodes(sim.state, JOB, [("n0", ((0, 0), (1, 1)))], 3.0, sim.cfg)
    assert core.release_nodes(sim.state, keep=lambda node: node != "n0") == 1
    sim.run(3, 10, skip={"n0"})
    assert sim.incidents() == []


# ----------------------------------------------------------------------------- job-wide hang, split


def _stall_both(a: Sim, b: Sim, until: float, deliver_at: float | None) -> None:
    """Every rank stalls at one step from t=4; rank 1 (n0, A's) is stopped by the OS. A watches
    n0, n1 and B n2, n3; A's incidents reach B at `deliver_at` (never if None)."""
    frozen_step = a.step
    t = 4.0
    sent = False
    while t < until:
        for sim, mine in ((a, ("n0", "n1")), (b, ("n2", "n3"))):
            if abs(t - round(t)) < 1e-6:
                for nd in mine:
                    over = {r: dict(step=frozen_step, since_progress_s=t - 4 + 0.1) for r in range(8)}
                    over[1]["proc_state"] = "T"
                    sim.beat(nd, t, overrides=over)
        if deliver_at is not None and not sent and t >= deliver_at - 1e-9 and a.incidents():
            for inc in a.incidents():
                peer(b, inc, t)
            sent = True
        a.tick(t)
        b.tick(t)
        t = round(t + 0.1, 6)


def _split_hang() -> tuple[Sim, Sim]:
    a = Sim(config=cfg(producer="detector/a", peer_grace_s=1.0))
    b = Sim(config=cfg(producer="detector/b", peer_grace_s=1.0))
    a.run(0, 4, skip={"n2", "n3"})
    b.run(0, 4, skip={"n0", "n1"})
    b.step = a.step
    return a, b


def test_split_job_wide_hang_is_one_incident_when_the_peer_names_the_stopped_process() -> None:
    a, b = _split_hang()
    _stall_both(a, b, 15, deliver_at=9.2)
    [inc] = a.incidents()
    assert inc.fault_class is FaultClass.HANG and inc.root_cause_ranks == (1,)
    assert b.incidents() == []
    assert b.state.jobs[JOB].incidents[inc.incident_id].symptoms == inc.symptoms_attributed + 4


def test_split_hang_without_a_peer_incident_is_reported_after_the_grace() -> None:
    a, b = _split_hang()
    _stall_both(a, b, 15, deliver_at=None)
    [inc] = b.incidents()
    assert inc.fault_class is FaultClass.HANG and inc.root_cause_nodes == ("n2", "n3")
    assert inc.confidence == 0.5
    [a_inc] = a.incidents()
    assert 1.0 - 1e-6 <= inc.detected_at - a_inc.detected_at <= 1.1 + 1e-6  # held for the grace


# ----------------------------------------------------------------------------- after a recovery


def _crash_then_recover(sim: Sim, *, fault_at: float = 3.0, done_at: int = 6) -> None:
    """Rank 2 on n1 crashes in generation 0; the sidecars take the pause of generation 1 at the
    next beat, report paused then recovering ranks, and everyone runs again from `done_at`."""
    sim.run(0, fault_at)
    sim.feed(exit_("n1", 2), fault_at)
    sim.generation = 1
    paused = {n: {"state": RankState.PAUSED} for n in sim.nodes}
    recovering = {n: {"state": RankState.RECOVERING} for n in sim.nodes}
    sim.run(fault_at + 0.1, fault_at + 1.1, per_node=paused)
    sim.run(fault_at + 1.1, done_at, per_node=recovering)
    sim.run(done_at, done_at + 1)


def test_late_peer_error_stamped_with_the_new_generation_joins_the_recovered_incident() -> None:
    # Issue #12 item 13: a survivor's "Connection closed by peer" read by its sidecar after the
    # pause carries the new generation; it belongs to the crash that was just recovered.
    sim = Sim()
    _crash_then_recover(sim)
    [crash] = sim.incidents()
    ds = sim.feed(log("n2", 4, "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:2950", generation=1), 7.2)
    sim.run(7.3, 14)
    assert sim.incidents() == [crash]
    joined = [d for d in sim.decisions if d.kind == "joined" and d.node_id == "n2"]
    assert [d.incident_id for d in joined] == [crash.incident_id]
    assert ds == [] or all(d.kind != "incident" for d in ds)
    assert sim.state.jobs[JOB].incidents[crash.incident_id].symptoms == 1


def test_late_error_of_the_old_generation_on_another_node_joins_its_root() -> None:
    sim = Sim()
    _crash_then_recover(sim)
    [crash] = sim.incidents()
    ds = sim.feed(log("n3", 6, "Connection reset by peer", generation=0), 7.2)
    assert [(d.kind, d.incident_id) for d in ds] == [("joined", crash.incident_id)]


def test_communication_error_long_after_a_recovery_is_still_reported() -> None:
    sim = Sim()
    _crash_then_recover(sim)
    sim.run(7, 20)
    sim.feed(log("n2", 4, "Connection reset by peer", generation=1), 20.0)
    sim.run(20.1, 26)
    assert [i.fault_class for i in sim.incidents()] == [FaultClass.PROCESS_CRASH, FaultClass.COMMUNICATION]


# ----------------------------------------------------------------------------- every dead rank restarted


def test_second_crash_on_a_reported_node_in_the_same_generation_is_its_own_incident() -> None:
    # Issue #12 item 7: the second rank must reach the planner, or the rebuild barrier never fills.
    sim = Sim()
    sim.run(0, 3)
    sim.feed(exit_("n1", 2), 3.0)
    ds = sim.feed(exit_("n1", 3), 3.1)
    [second] = [d.event for d in ds if d.kind == "incident"]
    assert second.fault_class is FaultClass.PROCESS_CRASH and second.action is RepairAction.RESTART_PROCESS
    assert (second.root_cause_nodes, second.root_cause_ranks, second.generation) == (("n1",), (3,), 0)
    # a redelivered report of either exit (new event id) adds nothing
    sim.feed(exit_("n1", 3, event_id="again-3"), 3.2)
    sim.feed(exit_("n1", 2, event_id="again-2"), 3.3)
    sim.run(3.4, 10, skip={"n1"})
    assert sorted(i.root_cause_ranks for i in sim.incidents()) == [(2,), (3,)]


def test_exit_on_a_node_whose_incident_replaces_it_joins() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(log("n1", 2, "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus"), 3.0)
    ds = sim.feed(exit_("n1", 3), 3.1)  # replace_node moves every rank of n1: covered
    assert [d.kind for d in ds] == ["joined"]


def test_late_exit_of_a_rank_the_old_plan_does_not_restart_is_a_new_incident() -> None:
    sim = Sim()
    _crash_then_recover(sim)
    ds = sim.feed(exit_("n1", 3, generation=0), 7.1)  # died in generation 0, heard after the advance
    [inc] = [d.event for d in ds if d.kind == "incident"]
    assert (inc.generation, inc.root_cause_nodes, inc.root_cause_ranks) == (1, ("n1",), (3,))
    again = sim.feed(exit_("n1", 2, generation=0, event_id="late-2"), 7.2)  # the old plan restarts it
    assert [d.kind for d in again] == ["joined"]


# ----------------------------------------------------------------------------- unanswered pause


def test_survivor_that_never_answers_the_pause_is_a_hang_naming_it() -> None:
    # Issue #12 item 3: the sidecar marks a survivor that did not confirm the pause within its
    # deadline HUNG; it must become an incident that restarts it (the superseding plan kills it).
    sim = Sim()
    sim.run(0, 3)
    [crash] = [d.event for d in sim.feed(exit_("n1", 2), 3.0) if d.kind == "incident"]
    sim.generation = 1
    paused = {n: {"state": RankState.PAUSED} for n in sim.nodes}
    sim.run(3.1, 9, per_node=paused)
    assert sim.incidents() == [crash]  # paused ranks are never judged by the clock
    hung = {6: {"state": RankState.HUNG, "proc_state": "T"}}
    ds = sim.beat("n3", 9.2, state=RankState.PAUSED, overrides=hung)
    [inc] = [d.event for d in ds if d.kind == "incident"]
    assert (inc.fault_class, inc.action) == (FaultClass.HANG, RepairAction.RESTART_PROCESS)
    assert (inc.generation, inc.root_cause_nodes, inc.root_cause_ranks) == (1, ("n3",), (6,))
    assert "did not answer the pause" in inc.reason
    # later beats with the same state, and the rank's exit when the new plan kills it, add nothing
    sim.beat("n3", 10.0, state=RankState.PAUSED, overrides=hung)
    sim.feed(exit_("n3", 6), 10.5)
    sim.run(10.6, 16, per_node=paused)
    assert sim.incidents() == [crash, inc]


def test_exit_held_as_a_symptom_when_the_generation_changes_is_still_restarted() -> None:
    sim = Sim()
    sim.run(0, 3)
    sim.feed(log("n1", 2, "Connection closed by peer"), 3.0)
    sim.feed(exit_("n1", 2, signal=None), 3.1)  # held: no root cause known yet
    assert sim.incidents() == []
    sim.generation = 1  # another instance's incident moved the job on meanwhile
    sim.run(3.2, 8)
    [inc] = sim.incidents()
    assert (inc.generation, inc.root_cause_nodes, inc.root_cause_ranks) == (1, ("n1",), (2,))
