"""Every consumer's decode/handle path against hostile input (hypothesis, issue #16 item 5, the
unit-level part): random bytes, truncated and oversized (>= 1 MiB) messages, valid envelopes
with absurd values (rank 10^9, negative steps, generations far ahead, unknown kinds, NaN/inf
timings, 10k-element lists), duplicates and reorderings. Each consumer: 0 crashes, 0 actions,
every bad message dead-lettered (or refused) with a reason, the next good message handled.

No broker and no Redis: bus.Consumer over a fake Kafka producer, the services' handlers with
the registry's view given in memory (the detector's core.Topology, the executor's
core.plan_refusal inputs, the sidecar's RegistryView)."""

from __future__ import annotations

import asyncio
import copy
import random
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_sidecar_commands import _handled, _sidecar

from flashrecovery.detector import core as dcore
from flashrecovery.detector.app import DetectorService
from flashrecovery.executor import core as xcore
from flashrecovery.executor.app import ExecutorService
from flashrecovery.planner import core as pcore
from flashrecovery.shared import bus as busmod
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import (
    CommandAck,
    CommandAction,
    ExecutorCommand,
    FaultClass,
    FaultIncident,
    LogEvent,
    NodeHeartbeat,
    RankState,
    RankStatus,
    RecoveryPlan,
    RepairAction,
    Replacement,
    SchemaError,
    Transfer,
    WorkerExit,
    decode,
    encode,
)
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.topology import grid_topology
from flashrecovery.sidecar.core import RegistryView

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JOB = "job-f"
SNAP = grid_topology(JOB, nodes=4, ranks_per_node=2, tp=2, spares=1)  # world 8, node-0..3, spare-0
TOPO = dcore.Topology(job_id=JOB, generation=0, world_size=8, nodes=frozenset(n.node_id for n in SNAP.nodes))
BUS = BusSettings(handler_retries=0)


# ------------------------------------------------------------------------------ the fakes
class FakeKafka:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers=None):
        assert len(value) <= 1 << 20, "a message a broker would refuse"
        self.sent.append((topic, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def on(self, topic: T.Topic) -> list[bytes]:
        return [v for t, v in self.sent if t == busmod.topic_name(topic, BUS)]


@dataclass
class Rec:
    topic: str
    value: bytes | None
    offset: int = 0
    key: bytes | None = b"k"
    partition: int = 0
    timestamp: int = 0


_UNSTARTED: list = []  # aiokafka clients built and never started: closed after each example
Producer, Consumer = busmod.Producer, busmod.Consumer  # the real ones (the sidecar's harness swaps them)


def _producer() -> tuple[busmod.Producer, FakeKafka]:
    fake = FakeKafka()
    p = Producer("127.0.0.1:1", BUS)
    _UNSTARTED.append(p._p)
    p._p = fake
    return p, fake


def _consumer(*args, **kw) -> busmod.Consumer:
    c = Consumer(*args, **kw)
    _UNSTARTED.append(c._c)
    return c


async def _close_clients(*services) -> None:
    for svc in services:
        for name in ("producer", "plan_consumer", "ack_consumer", "consumer"):
            obj = getattr(svc, name, None)
            client = getattr(obj, "_p", None) or getattr(obj, "_c", None)
            if client is not None:
                _UNSTARTED.append(client)
    while _UNSTARTED:
        client = _UNSTARTED.pop()
        try:
            await client.stop()
        except Exception:  # noqa: BLE001 - never started: nothing to stop
            pass


def _records(topic: T.Topic, values: list[bytes | None]) -> list[Rec]:
    name = busmod.topic_name(topic, BUS)
    return [Rec(name, None if v is None else bytes(v), offset=i) for i, v in enumerate(values)]


# ------------------------------------------------------------------------------ hostile bytes
def _padded(event) -> bytes:
    d = event.model_dump(mode="json")
    d["padding"] = "x" * (1 << 20)  # unknown fields are ignored: this one is only big
    return orjson.dumps(d)


LITERALS = [
    b"",
    b"null",
    b"[]",
    b"[1, 2]",
    b'"str"',
    b"{}",
    b"\xff\xfe",
    b"{" * 5000,
    b'{"schema_version": 1, "kind": "worker_exit", "step_time_s": NaN}',
    b'{"schema_version": 1, "kind": "node_heartbeat", "interval_s": Infinity}',
    b'{"schema_version": 1, "kind": "node_heartbeat", "interval_s": 1e999}',
    b'{"schema_version": 2, "kind": "worker_exit"}',
    b'{"schema_version": 1, "kind": "rm -rf"}',
]


class Big(bytes):
    """An oversized message (a 1 MiB+ message cut short): a short repr, so hypothesis reports
    stay readable. Fed to the consumers as plain bytes."""

    def __repr__(self) -> str:
        return f"Big({len(self)} bytes, {bytes(self[:60])!r}...)"


def hostile_bytes(good: list) -> st.SearchStrategy[bytes]:
    """Bytes no consumer can take: random, a good message cut short, literals, or 1 MiB+."""
    truncated = st.tuples(st.sampled_from(good), st.floats(0, 0.999)).map(
        lambda t: (lambda raw: raw[: int(len(raw) * t[1])])(encode(t[0]))
    )
    oversized = st.sampled_from(good).map(lambda e: Big(_padded(e)[: (1 << 20) + 100]))
    return st.one_of(st.binary(max_size=300), truncated, st.sampled_from(LITERALS), oversized)


def mutate(event, poison: str, benign: list[str]) -> bytes:
    """A valid envelope with one value a consumer must refuse (poison), and others merely absurd."""
    d = copy.deepcopy(event.model_dump(mode="json"))
    rows = d.get("ranks") or []
    for b in benign:  # absurd but not, alone, a reason to refuse
        if b == "negative_step":
            d["step"] = -(10**6)
            for r in rows:
                r["step"] = -(10**6)
        elif b == "huge_timings":
            for r in rows:
                r["since_progress_s"], r["step_time_s"] = 1e308, -1e308
        elif b == "old_emitted_at":
            d["emitted_at"] = -1e18
    if poison == "rank":
        if rows:
            rows[0]["rank"] = 10**9
        else:
            d["rank"] = 10**9
    elif poison == "negative_rank":
        if rows:
            rows[-1]["rank"] = -7
        else:
            d["rank"] = -7
    elif poison == "generation":
        d["generation"] = 10**12
    elif poison == "rank_generation" and rows:
        rows[0]["generation"] = 10**12
    elif poison == "node":
        d["node_id"] = "ghost-node"
    elif poison == "job":
        d["job_id"] = "someone-else"
    elif poison == "kind":
        d["kind"] = "node_reboot"
    elif poison == "version":
        d["schema_version"] = 99
    elif poison == "ten_thousand":
        if "ranks" in d:
            d["ranks"] = [dict(rows[0], rank=100 + i) for i in range(10_000)]
        else:
            d["rank"] = 10_000
    else:
        d["generation"] = -1  # schema: ge=0
    return orjson.dumps(d)


# ------------------------------------------------------------------------------ the detector
def _beat(node: int, seq: int) -> NodeHeartbeat:
    return NodeHeartbeat(
        job_id=JOB,
        generation=0,
        producer="s",
        node_id=f"node-{node}",
        seq=seq,
        ranks=tuple(
            RankStatus(
                rank=2 * node + lr,
                local_rank=lr,
                pid=100 + lr,
                state=RankState.RUNNING,
                step=seq,
                step_time_s=0.1,
                since_progress_s=0.1,
            )
            for lr in range(2)
        ),
    )


GOOD_TELEMETRY = [_beat(n, s) for n in range(4) for s in (1, 2)] + [
    WorkerExit(job_id=JOB, generation=0, producer="s", node_id="node-2", rank=5, pid=9, exit_code=0, expected=True),
    LogEvent(job_id=JOB, generation=0, producer="s", node_id="node-0", rank=0, line="step 3 ok"),
]
WORKER_POISONS = [
    "rank",
    "negative_rank",
    "generation",
    "rank_generation",
    "node",
    "job",
    "kind",
    "version",
    "ten_thousand",
    "schema",
]
BENIGN = st.lists(st.sampled_from(["negative_step", "huge_timings", "old_emitted_at"]), max_size=3)


def absurd_telemetry() -> st.SearchStrategy[bytes]:
    return st.builds(mutate, st.sampled_from(GOOD_TELEMETRY), st.sampled_from(WORKER_POISONS), BENIGN)


@FUZZ
@example(
    bad=[Big(_padded(GOOD_TELEMETRY[0])[: (1 << 20) + 100])]
    + LITERALS
    + [mutate(e, p, ["negative_step", "huge_timings"]) for e in GOOD_TELEMETRY[::4] for p in WORKER_POISONS],
    good=GOOD_TELEMETRY,
    seed=random.Random(0),
)
@given(
    bad=st.lists(st.one_of(hostile_bytes(GOOD_TELEMETRY), absurd_telemetry()), min_size=1, max_size=6),
    good=st.lists(st.sampled_from(GOOD_TELEMETRY), max_size=8),
    seed=st.randoms(use_true_random=False),
)
def test_detector(bad, good, seed) -> None:
    async def go() -> None:
        producer, fake = _producer()
        svc = DetectorService(Settings(job_id=JOB), instance="fuzz")
        svc._producer = producer
        svc.topology = TOPO
        svc.clock = lambda: 5000.0
        consumer = _consumer(
            "127.0.0.1:1",
            BUS,
            [T.HEARTBEATS, T.WORKER_EVENTS],
            None,
            svc._handle_one,
            producer,
            "detector",
            batch_handler=svc._handle_batch,
        )
        # the good ones duplicated and out of order, the bad ones among them
        mixed = [(True, encode(e)) for e in good + good] + [(False, raw) for raw in bad]
        seed.shuffle(mixed)
        await consumer._handle_records(_records(T.WORKER_EVENTS, [raw for _, raw in mixed]))
        assert fake.on(T.INCIDENTS) == [], "an action on hostile or duplicated input"
        letters = [orjson.loads(v) for v in fake.on(T.DEAD_LETTER)]
        assert len(letters) == len(bad) and all(letter["reason"] for letter in letters)
        assert consumer.dead_lettered + svc.refused == len(bad)
        crash = WorkerExit(job_id=JOB, generation=0, producer="s", node_id="node-1", rank=3, pid=7, signal=9)
        await consumer._handle_records(_records(T.WORKER_EVENTS, [encode(crash), encode(crash)]))
        incidents = [orjson.loads(v) for v in fake.on(T.INCIDENTS)]
        assert len(incidents) == 1 and incidents[0]["root_cause_nodes"] == ["node-1"]
        assert incidents[0]["fault_class"] == FaultClass.PROCESS_CRASH.value and incidents[0]["generation"] == 0
        await _close_clients()

    asyncio.run(go())


# ------------------------------------------------------------------------------ the executor
def _plan(**update) -> RecoveryPlan:
    p = RecoveryPlan(
        job_id=JOB,
        generation=0,
        producer="planner",
        plan_id="plan-good",
        incident_ids=("i",),
        target_generation=1,
        world_size=8,
        restart_ranks=(2, 3),
        faulty_nodes=("node-1",),
        replacements=(
            Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=0),
            Replacement(rank=3, from_node="node-1", to_node="spare-0", local_rank=1),
        ),
        transfers=(Transfer(src=6, dst=2), Transfer(src=7, dst=3)),
        recovery_step=5,
    )
    return p.model_copy(update=update)


ABSURD_PLANS = {
    "rank": dict(restart_ranks=(10**9,), replacements=(), transfers=()),
    "world": dict(world_size=-1),
    "big_world": dict(world_size=10**9),
    "generation": dict(target_generation=10**12),
    "no_restart": dict(restart_ranks=()),
    "ten_thousand": dict(restart_ranks=tuple(range(10_000))),
    "ghost_target": dict(replacements=(Replacement(rank=2, from_node="node-1", to_node="ghost", local_rank=0),)),
    "ghost_faulty": dict(faulty_nodes=("ghost",)),
    "source": dict(transfers=(Transfer(src=10**9, dst=2),)),
    "restarted_source": dict(transfers=(Transfer(src=3, dst=2),)),
    "negative_local": dict(replacements=(Replacement(rank=2, from_node="node-1", to_node="spare-0", local_rank=-1),)),
    "twice": dict(restart_ranks=(2, 2)),
}


def _refusal(plan: RecoveryPlan) -> str | None:
    """core.plan_refusal with the registry's view of SNAP; `stored` = the plan itself, i.e. even
    one the planner had recorded must be sound."""
    nodes = {n.node_id: n for n in SNAP.nodes}
    return xcore.plan_refusal(
        plan,
        generation=0,
        world_size=8,
        rank_nodes={r.rank: r.node_id for r in SNAP.ranks},
        nodes_by_id={n: nodes[n] for n in xcore.named_nodes(plan) if n in nodes},
        stored=plan,
    )


def _decodes(raw: bytes) -> bool:
    try:
        decode(raw)
        return True
    except SchemaError:
        return False


def _ack(**update) -> CommandAck:
    a = CommandAck(
        job_id=JOB,
        generation=1,
        producer="s",
        command_id="plan-good:pause:0",
        plan_id="plan-good",
        incident_id="i",
        action=CommandAction.PAUSE,
        node_id="node-0",
    )
    return a.model_copy(update=update)


@FUZZ
@example(
    bad=[Big(_padded(_plan())[: (1 << 20) + 100])]
    + LITERALS
    + [encode(_plan(plan_id=f"plan-{k}", **v)) for k, v in sorted(ABSURD_PLANS.items())],
    acks=[encode(_ack(node_id="ghost", ok=False, generation=10**12, detail="x" * 10_000))],
)
@given(
    bad=st.lists(
        st.one_of(
            hostile_bytes([_plan(), _ack()]),
            st.sampled_from(sorted(ABSURD_PLANS)).map(lambda k: encode(_plan(plan_id=f"plan-{k}", **ABSURD_PLANS[k]))),
        ),
        min_size=1,
        max_size=6,
    ),
    acks=st.lists(
        st.builds(
            lambda n, ok, gen, k: encode(_ack(node_id=n, ok=ok, generation=gen, detail="x" * k)),
            st.sampled_from(["node-0", "ghost", ""]),
            st.booleans(),
            st.sampled_from([0, 1, 10**12]),
            st.sampled_from([0, 10_000]),
        ),
        max_size=4,
    ),
)
def test_executor(bad, acks) -> None:
    async def go() -> None:
        producer, fake = _producer()
        svc = ExecutorService(
            Settings(job_id=JOB, instance="0", kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:9")
        )
        try:
            plans = _consumer("127.0.0.1:1", BUS, [T.PLANS], None, svc.on_plan, producer, "executor-plans")
            ack_c = _consumer("127.0.0.1:1", BUS, [T.ACKS], None, svc.on_ack, producer, "executor-acks")
            await plans._handle_records(_records(T.PLANS, bad))
            await ack_c._handle_records(_records(T.ACKS, acks + acks[::-1]))
            assert fake.on(T.COMMANDS) == [] and svc.commands_sent == 0
            decodable = [raw for raw in bad if _decodes(raw)]
            assert plans.dead_lettered == len(bad) - len(decodable) and len(fake.on(T.DEAD_LETTER)) >= len(bad) - len(
                decodable
            )
            assert len(svc.plans) == len({orjson.loads(raw)["plan_id"] for raw in decodable})
            for plan in svc.plans.values():  # every plan that decodes is refused with a reason
                assert _refusal(plan), plan.plan_id
            # the ack path: no crash judging them, and a negative ack from a waited-for node fails
            got = svc.acks.get("plan-good:pause:0", {}).get("done", {})
            verdict = xcore.judge(got, frozenset({"node-0"}), 0.0, 1.0, 60.0, 0, 0)
            assert verdict.outcome in ("advance", "wait", "fail", "retry") and verdict.reason
            xcore.select_plan(svc.plans.values(), {}, 0)  # choosing among them does not crash
            good = _plan()
            await plans._handle_records(_records(T.PLANS, [encode(good)]))
            assert svc.plans["plan-good"] == good and _refusal(good) is None
        finally:
            await svc.registry.close()
            await _close_clients(svc)

    asyncio.run(go())


# ------------------------------------------------------------------------------ the sidecar
def _command(**update) -> ExecutorCommand:
    c = ExecutorCommand(
        job_id=JOB,
        generation=4,
        producer="executor-0",
        command_id="p:pause:0",
        plan_id="p",
        incident_id="i",
        action=CommandAction.PAUSE,
        fence_token=2,
    )
    return c.model_copy(update=update)


ABSURD_COMMANDS = {
    "generation": dict(generation=10**9),
    "token": dict(fence_token=10**18),
    "kill": dict(kill_ranks=(10**9,)),
    "negative_kill": dict(kill_ranks=(-1,)),
    "ten_thousand": dict(kill_ranks=tuple(range(10_000))),
    "recover_world": dict(action=CommandAction.RECOVER, world_size=-1, resume_step=3),
    "recover_step": dict(action=CommandAction.RECOVER, world_size=8, resume_step=-5),
    "transfer": dict(
        action=CommandAction.RECOVER, world_size=8, resume_step=3, transfers=(Transfer(src=10**9, dst=1),)
    ),
}


@FUZZ
@example(
    bad=[Big(_padded(_command())[: (1 << 20) + 100])]
    + LITERALS
    + [encode(_command(command_id=f"forged:{k}", **v)) for k, v in sorted(ABSURD_COMMANDS.items())]
)
@given(
    bad=st.lists(
        st.one_of(
            hostile_bytes([_command()]),
            st.sampled_from(sorted(ABSURD_COMMANDS)).map(
                lambda k: encode(_command(command_id=f"forged:{k}", **ABSURD_COMMANDS[k]))
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_sidecar(bad, tmp_path_factory) -> None:
    async def go() -> None:
        mp = pytest.MonkeyPatch()
        try:
            svc, acks = await _sidecar(tmp_path_factory.mktemp("sc"), "node-1", mp)
            svc.s = svc.s.model_copy(update={"job_id": JOB})

            async def view():
                return RegistryView(generation=4, world_size=8, fence_token=2)

            svc._registry_view = view
            producer, fake = _producer()
            c = _consumer("127.0.0.1:1", BUS, [T.COMMANDS], None, svc.on_command, producer, "sidecar")
            await c._handle_records(_records(T.COMMANDS, bad + bad))
            await asyncio.wait_for(asyncio.gather(*list(svc.tasks)), 10)
            assert acks == [] and not svc.tasks, "a hostile command was acted on"
            forged = sum(1 for raw in bad if b"forged:" in raw[:2000])
            assert c.dead_lettered == 2 * (len(bad) - forged)
            assert svc.gate.refused_commands == 2 * forged
            assert svc.gate.generation <= 4 and svc.gate.fence_token <= 2
            await _handled(svc, _command())
            assert [a.command_id for a in acks] == ["p:pause:0"] and acks[0].ok
        finally:
            await _close_clients()
            mp.undo()

    asyncio.run(go())


# ------------------------------------------------------------------------------ the planner
def _incident(**update) -> FaultIncident:
    i = FaultIncident(
        job_id=JOB,
        generation=0,
        producer="detector",
        incident_id="inc-good",
        fault_class=FaultClass.PROCESS_CRASH,
        action=RepairAction.RESTART_PROCESS,
        root_cause_nodes=("node-1",),
        root_cause_ranks=(3,),
        first_seen_at=10.0,
        detected_at=10.2,
    )
    return i.model_copy(update=update)


ABSURD_INCIDENTS = {
    "ghost_node": dict(root_cause_nodes=("ghost",), root_cause_ranks=()),
    "ghost_rank": dict(root_cause_nodes=(), root_cause_ranks=(10**9,)),
    "negative_rank": dict(root_cause_nodes=(), root_cause_ranks=(-3,)),
    "ten_thousand": dict(root_cause_nodes=tuple(f"ghost-{i}" for i in range(10_000)), root_cause_ranks=()),
    "generation": dict(generation=10**12),
    "job": dict(job_id="someone-else"),
    "no_action": dict(action=RepairAction.NONE),
    "absurd_times": dict(root_cause_nodes=("ghost",), root_cause_ranks=(), first_seen_at=-1e300, detected_at=1e300),
}


@FUZZ
@example(
    bad=[Big(_padded(_incident())[: (1 << 20) + 100])]
    + [encode(_incident(incident_id=f"inc-{k}", **v)) for k, v in sorted(ABSURD_INCIDENTS.items())]
)
@given(
    bad=st.lists(
        st.one_of(
            hostile_bytes([_incident()]),
            st.sampled_from(sorted(ABSURD_INCIDENTS)).map(
                lambda k: encode(_incident(incident_id=f"inc-{k}", **ABSURD_INCIDENTS[k]))
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_planner(bad) -> None:
    """The planner's decode path and its pure decisions (incident_refusal, then plan): the shell
    around them needs Redis and is covered by tests/integration/test_planner_service.py."""

    async def go() -> None:
        producer, fake = _producer()
        refused: list[str] = []
        decisions: list = []

        async def handle(event, record) -> None:
            if not isinstance(event, FaultIncident):
                refused.append(f"not an incident: {event.kind}")
                return
            why = pcore.incident_refusal(event, JOB, 0)
            if why is not None:
                refused.append(why)
                return
            decisions.append(pcore.plan(SNAP, [event], pcore.Policy(), 1000.0))

        c = _consumer("127.0.0.1:1", BUS, [T.INCIDENTS], None, handle, producer, "planner")
        await c._handle_records(_records(T.INCIDENTS, bad + bad[::-1]))
        assert all(isinstance(d, pcore.NoPlan) for d in decisions), "a plan from a hostile incident"
        assert c.dead_lettered + len(refused) + len(decisions) == 2 * len(bad)
        assert len(fake.on(T.DEAD_LETTER)) == c.dead_lettered
        await c._handle_records(_records(T.INCIDENTS, [encode(_incident())]))
        good = decisions[-1]
        assert isinstance(good, RecoveryPlan) and good.restart_ranks == (3,) and _refusal(good) is None
        await _close_clients()

    asyncio.run(go())
