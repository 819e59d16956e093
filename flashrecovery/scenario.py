"""Scripted overlapping faults: a first fault, then further worker faults and control-plane
faults timed from the first incident's detection. `flashrecovery demo --then/--service-fault`
and the e2e scenario tests run the very same code.

    --then KIND:RANK:DELAY_S        process-crash | hang | node-crash on RANK, DELAY_S after the
                                    first incident was detected (0 = at once, 0.1 = inside the
                                    recovery)
    --service-fault NAME:DELAY_S    executor-leader (SIGKILL, restarted at once as a container
                                    would be), executor-leader-stall (SIGSTOP for longer than the
                                    lease, then SIGCONT), detector, planner (SIGKILL + restart),
                                    redis (restarted empty on its port: the registry is lost),
                                    redis-restart (SIGKILL, restarted on its port from its
                                    append-only file); both only where this run started Redis;
                                    broker (SIGKILL, restarted empty on its port, topics created
                                    again: consumers start recreated partitions from the
                                    beginning, the executor sends a phase's command again every
                                    command_resend_s until acknowledged)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from .cluster import LocalCluster
from .shared import bus as busmod
from .shared.keys import EXECUTOR_LEASE
from .shared.registry import Registry
from .shared.schemas import Escalation
from .shared.stack import OwnedProcess, Stack, start_broker, start_redis

WORKER_FAULTS = ("process-crash", "hang", "node-crash")
DETECT_GRACE_S = 3.0
SERVICE_FAULTS = (
    "executor-leader",
    "executor-leader-stall",
    "detector",
    "planner",
    "redis",
    "redis-restart",
    "broker",
)


@dataclass(frozen=True)
class Scenario:
    """One #12 scenario: a first fault, then follow-ups; `expect` is "exact" (bitwise equal to
    a fault-free run, no committed step lost) or "escalate" (loudly, with `escalation_match` in
    the reason). `at_step` None: the caller's default; -1: the job's last step."""

    fault: str
    rank: int
    then: tuple[str, ...] = ()
    service_faults: tuple[str, ...] = ()
    at_step: int | None = None
    job_args: str = ""
    spares: int = 1
    expect: str = "exact"
    escalation_match: str = ""
    own_redis: bool = False  # the run starts its own Redis (a redis fault restarts it)
    own_broker: bool = False  # the run starts its own broker (a broker fault restarts it)

    def demo_args(self, steps: int, default_at: int) -> str:
        """The same scenario as a `flashrecovery demo` command line."""
        at = self.step(steps, default_at)
        parts = [f"--fault {self.fault} --rank {self.rank} --at-step {at} --steps {steps}"]
        parts += [f"--then {t}" for t in self.then] + [f"--service-fault {f}" for f in self.service_faults]
        if self.spares != 1:
            parts.append(f"--spares {self.spares}")
        if self.job_args:
            parts.append(self.job_args)  # only --optimizer: a flag the demo takes as is
        return " ".join(parts)

    def step(self, steps: int, default_at: int) -> int:
        return steps if self.at_step == -1 else (self.at_step or default_at)


# The #12 scenario list, run by tests/e2e/test_scenarios.py and bench/scenarios.py. (dp 4 x tp 2
# on 4 nodes of 2 ranks: node-k holds ranks 2k and 2k+1; shard = rank % 2.)
SCENARIOS: dict[str, Scenario] = {
    "crash-then-crash-same-node": Scenario("process-crash", 2, then=("process-crash:3:0",)),
    "crash-then-crash-inside-rebuild": Scenario("process-crash", 2, then=("process-crash:5:0.15",)),
    "two-nodes-at-once": Scenario("process-crash", 2, then=("process-crash:5:0",)),
    "crash-then-crash-other-dp-group": Scenario("process-crash", 0, then=("process-crash:6:0.1",)),
    "hang-then-crash": Scenario("hang", 6, then=("process-crash:1:1",)),
    "sgd-momentum-crash-then-crash": Scenario(
        "process-crash", 2, then=("process-crash:5:0.1",), job_args="--optimizer sgd"
    ),
    "crash-in-last-step": Scenario("kill-optimizer", 5, at_step=-1),
    "kill-inside-commit-vote": Scenario("kill-vote", 3),
    "executor-leader-killed": Scenario("process-crash", 2, service_faults=("executor-leader:0.1",)),
    "executor-leader-stalled": Scenario("process-crash", 2, service_faults=("executor-leader-stall:0.1",)),
    "detector-and-planner-killed": Scenario("process-crash", 2, service_faults=("detector:0.05", "planner:0.05")),
    # early first fault: training still runs when the second crash comes, after the first
    # recovery ended and Redis came back empty
    "redis-lost-then-crash": Scenario(
        "process-crash",
        2,
        at_step=2,
        then=("process-crash:5:3.5",),
        service_faults=("redis:2.5",),
        own_redis=True,
        expect="escalate",
        escalation_match="no topology",
    ),
    # Redis crashes inside the recovery and comes back from its append-only file: the registry
    # survives, the services reconnect, the recovery ends exact.
    "redis-restarted-inside-recovery": Scenario(
        "process-crash", 2, service_faults=("redis-restart:0.1",), own_redis=True
    ),
    # The embedded broker (memory only) is killed inside the recovery and comes back empty:
    # commands and acks produced around it are lost and sent again (executor command_resend_s),
    # consumers start the recreated topics from the beginning and survive the group the broker
    # forgot; a second crash 4 s later, after the first recovery, is detected and recovered.
    "broker-restarted-then-crash": Scenario(
        "process-crash", 2, then=("process-crash:5:4",), service_faults=("broker:0.1",), own_broker=True
    ),
    "no-spare-policy-wait": Scenario("node-crash", 2, spares=0, expect="escalate", escalation_match="capacity"),
    "every-replica-of-a-shard-lost": Scenario(
        "process-crash",
        0,
        then=("process-crash:2:0", "process-crash:4:0", "process-crash:6:0"),
        expect="escalate",
        escalation_match="replica",
    ),
}


def _delay(text: str, spec: str) -> float:
    try:
        d = float(text)
    except ValueError:
        raise ValueError(f"{spec!r}: delay {text!r} is not a number of seconds") from None
    if not 0 <= d <= 600:
        raise ValueError(f"{spec!r}: delay must be within 0..600 s")
    return d


@dataclass(frozen=True)
class FollowUp:
    kind: str
    rank: int
    delay_s: float

    @classmethod
    def parse(cls, spec: str) -> FollowUp:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"{spec!r}: expected KIND:RANK:DELAY_S")
        kind, rank, delay = parts
        if kind not in WORKER_FAULTS:
            raise ValueError(f"{spec!r}: kind must be one of {', '.join(WORKER_FAULTS)}")
        if not rank.isdigit():
            raise ValueError(f"{spec!r}: rank {rank!r} is not a rank number")
        return cls(kind, int(rank), _delay(delay, spec))


@dataclass(frozen=True)
class ServiceFault:
    name: str
    delay_s: float

    @classmethod
    def parse(cls, spec: str) -> ServiceFault:
        name, sep, delay = spec.partition(":")
        if not sep:
            raise ValueError(f"{spec!r}: expected NAME:DELAY_S")
        if name not in SERVICE_FAULTS:
            raise ValueError(f"{spec!r}: NAME must be one of {', '.join(SERVICE_FAULTS)}")
        return cls(name, _delay(delay, spec))


@dataclass
class ScenarioLog:
    """What was done when (wall times), for the report."""

    first_incident_at: float | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)

    def add(self, what: str, **detail: Any) -> None:
        self.actions.append({"at": time.time(), "what": what, **detail})


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it died already: the fault happened anyway


async def _executor_leader(cluster: LocalCluster) -> str:
    reg = Registry.from_url(cluster.sup.stack.redis_url, cluster.settings.job_id)
    try:
        holder = await reg.lease_holder(EXECUTOR_LEASE)
    finally:
        await reg.close()
    if holder is None:
        raise RuntimeError("no executor holds the lease")
    return f"executor-{holder}"


async def apply_service_fault(cluster: LocalCluster, name: str, log: ScenarioLog) -> None:
    sup = cluster.sup
    if name in ("executor-leader", "executor-leader-stall"):
        proc_name = await _executor_leader(cluster)
        proc = sup.procs[proc_name]
        if name == "executor-leader":
            _signal(proc.pid, signal.SIGKILL)
            proc.wait(10)
            log.add("executor leader killed", process=proc_name, pid=proc.pid)
            sup.start_service("executor", proc_name, FLASHRECOVERY_INSTANCE=proc_name.removeprefix("executor-"))
            log.add("executor restarted", process=proc_name)
        else:
            stall = cluster.settings.executor.lease_ttl_s + 2.0
            _signal(proc.pid, signal.SIGSTOP)
            log.add("executor leader stopped", process=proc_name, pid=proc.pid, for_s=stall)
            await asyncio.sleep(stall)
            _signal(proc.pid, signal.SIGCONT)
            log.add("executor leader continued", process=proc_name, pid=proc.pid)
        return
    if name in ("redis", "redis-restart"):
        _restart_redis(cluster, log, keep_data=name == "redis-restart")
        return
    if name == "broker":
        await _restart_broker(cluster, log)
        return
    proc = sup.procs[name]
    _signal(proc.pid, signal.SIGKILL)
    proc.wait(10)
    log.add(f"{name} killed", pid=proc.pid)
    sup.start_service(name)
    log.add(f"{name} restarted")


def _kill_owned(cluster: LocalCluster, name: str) -> tuple[Stack, OwnedProcess]:
    """SIGKILL the `name` process (broker, redis) of the stack this run started itself."""
    stack = cluster.sup.stack
    owned = next((p for p in stack.owned if p.name == name), None) if stack else None
    if stack is None or owned is None:
        raise RuntimeError(f"{name} fault: this run did not start the {name} it uses")
    owned.proc.kill()
    owned.proc.wait(10)
    return stack, owned


async def _restart_broker(cluster: LocalCluster, log: ScenarioLog) -> None:
    """SIGKILL the broker this run started and start it again on the same port. Its storage is
    memory only: every topic and record is gone. The topics are created again here (nothing in
    the services creates them after start-up); the services must reconnect, and the registry in
    Redis carries the recovery."""
    stack, owned = _kill_owned(cluster, "broker")
    port = int(stack.kafka_bootstrap.rsplit(":", 1)[1])
    data_dir = owned.log_path.parent
    schemas = data_dir / "broker-schemas"
    restarted = start_broker(data_dir, port, schema_dir=schemas if schemas.is_dir() else None)
    stack.owned[stack.owned.index(owned)] = restarted
    await busmod.ensure_topics(stack.kafka_bootstrap, cluster.settings.bus)
    log.add("broker restarted empty", port=port)


def _restart_redis(cluster: LocalCluster, log: ScenarioLog, *, keep_data: bool) -> None:
    """SIGKILL the Redis this run started and start it again on the same port: from its
    append-only file (keep_data: a crash and restart), or empty (its files deleted: the
    registry is lost)."""
    stack, owned = _kill_owned(cluster, "redis")
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    data_dir = owned.log_path.parent
    if not keep_data:
        shutil.rmtree(data_dir / "appendonlydir", ignore_errors=True)
    stack.owned[stack.owned.index(owned)] = start_redis(data_dir, port)
    log.add("redis restarted" + ("" if keep_data else " empty"), port=port)


async def run_followups(
    cluster: LocalCluster, then: list[FollowUp], service_faults: list[ServiceFault], timeout_s: float, log: ScenarioLog
) -> None:
    """Wait for the first incident, then apply every follow-up at its delay (concurrently)."""
    if not then and not service_faults:
        return
    await cluster.wait_until(lambda: bool(cluster.timeline.incidents), timeout_s, "the first incident")
    t0 = time.monotonic()
    log.first_incident_at = time.time()

    async def at(delay: float, coro_fn) -> None:
        await asyncio.sleep(max(0.0, t0 + delay - time.monotonic()))
        await coro_fn()

    async def worker(f: FollowUp) -> None:
        t = cluster.fault_now(f.kind, f.rank)
        log.add(f"{f.kind} on rank {f.rank}", fault_at=t)

    tasks = [at(f.delay_s, lambda f=f: worker(f)) for f in then]
    tasks += [at(s.delay_s, lambda s=s: apply_service_fault(cluster, s.name, log)) for s in service_faults]
    await asyncio.gather(*tasks)
    if then:
        # the last worker fault's incident is published within ~0.1 s (exits are seen at once):
        # let it land before anyone judges whether the run has settled
        n = len(cluster.timeline.incidents)
        with contextlib.suppress(TimeoutError):
            await cluster.wait_until(
                lambda: len(cluster.timeline.incidents) > n, DETECT_GRACE_S, "the follow-up's incident"
            )


def escalations(cluster: LocalCluster) -> list[Escalation]:
    return [e for e in cluster.timeline.other if isinstance(e, Escalation)]


def _plans_ended(cluster: LocalCluster) -> bool:
    """The newest plan ended (an older one that was never driven may never report)."""
    tl = cluster.timeline
    if not tl.plans:
        return True
    newest = max(tl.plans, key=lambda p: (p.target_generation, p.emitted_at))
    return any(c.plan_id == newest.plan_id for c in tl.completed)


def _incidents_answered(cluster: LocalCluster) -> bool:
    """Every incident seen is carried by a plan or an escalation (a fault that hit a rank after
    it wrote its final state still needs its answer before the run counts as finished)."""
    tl = cluster.timeline
    answered = {i for p in tl.plans for i in p.incident_ids}
    answered |= {i for e in escalations(cluster) for i in e.incident_ids}
    return all(i.incident_id in answered for i in tl.incidents)


def _finished(cluster: LocalCluster) -> bool:
    """Every rank wrote its final state, every incident was answered and no recovery is still
    being driven (a rank replaced in the last step writes its state before verify ends)."""
    return cluster.finished() and _incidents_answered(cluster) and _plans_ended(cluster)


def _escalated_for_good(cluster: LocalCluster) -> bool:
    """An escalation with every plan seen ended: nothing is driving a recovery any more. (A plan
    can fail and escalate while a newer plan that covers its incidents is already under way.)"""
    return bool(escalations(cluster)) and _plans_ended(cluster)


async def wait_settled(cluster: LocalCluster, timeout_s: float, grace_s: float = 5.0) -> str:
    """Wait until training finished ("finished") or the control plane gave up loudly and stayed
    quiet for grace_s ("escalated")."""
    deadline = time.monotonic() + timeout_s
    while True:
        await cluster.wait_until(
            lambda: _finished(cluster) or _escalated_for_good(cluster),
            max(0.1, deadline - time.monotonic()),
            "training to finish",
        )
        if _finished(cluster):
            return "finished"
        seen = len(cluster.timeline.plans)
        await asyncio.sleep(grace_s)
        if _finished(cluster):
            return "finished"
        if len(cluster.timeline.plans) == seen and _escalated_for_good(cluster):
            return "escalated"
