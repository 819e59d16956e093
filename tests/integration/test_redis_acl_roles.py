"""Redis ACL users per role (issue #16 item 3, keys.ROLE_GRANTS) on the real redis-server: each
role's user runs the registry calls its service makes, and is refused what another role does.
Every refusal is also run with the job-wide rules (`acl_rules("job")`, one user for the whole
job): there it must succeed, so each refusal comes from the role's grants, not from the call
failing anyway."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from flashrecovery.shared.keys import EXECUTOR_LEASE, PLAN_ID_PREFIX, JobKeys, Role
from flashrecovery.shared.registry import Registry
from flashrecovery.shared.schemas import NodeRole, RankState
from flashrecovery.shared.topology import NodeRecord, grid_topology

pytestmark = pytest.mark.timeout(90)

PID = PLAN_ID_PREFIX + "0123456789abcdef01234567"


def _url_for(base: str, user: str, password: str) -> str:
    u = urlsplit(base)
    return f"{u.scheme}://{user}:{password}@{u.hostname}:{u.port}{u.path}"


def _refused_by_acl(exc: BaseException) -> bool:
    """NOPERM, or a command a script ran refused by the user's ACL (redis 7.0 answers those
    with ERR 'The user executing the script can't ...')."""
    if isinstance(exc, NoPermissionError):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and ("NOPERM" in text or "user executing the script can't" in text)


class Acl:
    """The ACL users and jobs of one test, removed at its end."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.admin = aioredis.Redis.from_url(base_url)
        self.tag = uuid.uuid4().hex[:8]
        self.users: list[str] = []
        self.jobs: set[str] = set()
        self.clients: list[Any] = []

    async def url(self, job: str, role: Role, rules: Role | None = None) -> str:
        """A user of `job` with `rules`' grants (default: the role's own) -> its URL."""
        user = f"fr-{job}-{role}"
        await self.admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", f">pw-{user}", *JobKeys(job).acl_rules(rules or role)
        )
        self.users.append(user)
        self.jobs.add(job)
        return _url_for(self.base_url, user, f"pw-{user}")

    async def registry(self, job: str, role: Role, rules: Role | None = None, keys_of: str | None = None) -> Registry:
        """A Registry as `role` of `job`, on `keys_of`'s keys (default: its own)."""
        reg = Registry.from_url(await self.url(job, role, rules), keys_of or job)
        self.clients.append(reg.r)
        self.jobs.add(keys_of or job)
        return reg

    async def fresh_job(self, job: str) -> None:
        """The job's keys gone and its topology registered again, as the default user."""
        await self.drop_keys(job)
        await Registry(self.admin, job).init_job(grid_topology(job, nodes=2, ranks_per_node=2, tp=2))
        self.jobs.add(job)

    async def drop_keys(self, job: str) -> None:
        keys = [k async for k in self.admin.scan_iter(match=f"{JobKeys(job).glob().prefix_glob}")]
        if keys:
            await self.admin.delete(*keys)

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()
        for user in self.users:
            await self.admin.execute_command("ACL", "DELUSER", user)
        for job in self.jobs:
            await self.drop_keys(job)
        await self.admin.aclose()


@pytest_asyncio.fixture
async def acl(settings):
    a = Acl(settings.redis_url)
    yield a
    await a.close()


async def test_each_role_runs_its_services_registry_calls(acl: Acl):
    """The registry calls of each service (services/*/app.py) and of the operator's tools
    (flashrecovery/), as that role's user. The script cache is flushed before each role, so each
    loads the registry's scripts itself (SCRIPT LOAD after NOSCRIPT, as after a Redis restart)."""
    job = f"roles-{acl.tag}"
    op, det, pl, ex, sc = [
        await acl.registry(job, r) for r in ("operator", "detector", "planner", "executor", "sidecar")
    ]

    # the run's watcher / `flashrecovery job register`, `status`
    await acl.admin.script_flush()
    assert await op.init_job(grid_topology(job, nodes=2, ranks_per_node=2, tp=2))
    assert (await op.snapshot()).world_size == 4
    assert await op.open_incidents() == [] and await op.quarantine_notes() == {}

    # detector: admission, the nodes it watches, a snapshot per incident, liveness
    await acl.admin.script_flush()
    gen, world, _ = await det.admission_view()
    assert (gen, world) == (0, 4)
    assert await det.node_ids() == frozenset({"node-0", "node-1", "spare-0"})
    assert (await det.snapshot()).generation == 0
    await det.heartbeat_liveness("detector", "0")

    # planner: records the incident, node faults, the plan once, its side effects and markers
    await acl.admin.script_flush()
    iid = f"inc-{acl.tag}"
    assert await pl.generation() == 0 and (await pl.meta())[b"world_size"] == b"4"
    assert await pl.topology_version() is not None and len((await pl.topology_rows())[1]) == 4
    assert not await pl.handled("planner", iid)
    assert await pl.incident_transition(iid, None, "planned", 0, detector="d0") == (True, "planned")
    assert await pl.open_incidents() == [iid] and (await pl.incident(iid))["phase"] == "planned"
    await pl.record_node_faults(["node-1"], iid, 100.0, 3600.0)
    assert await pl.node_fault_history(["node-1"], 0.0) == {"node-1": {iid: 100.0}}
    assert await pl.put_plan_once(PID, b"{}") and not await pl.put_plan_once(PID, b"{}")
    assert await pl.get_plan(PID) == b"{}"
    assert not await pl.side_effect_done(PID, "published")
    assert await pl.side_effect_once(PID, "published") and await pl.side_effect_done(PID, "published")
    assert await pl.side_effect_once("esc-0", "escalated")
    assert (await pl.incident_transition(iid, "planned", "planned", 0, plan_id=PID))[0]
    await pl.mark_handled("planner", iid)
    assert await pl.handled("planner", iid) and await pl.active_plan_id() is None
    await pl.heartbeat_liveness("planner", "0")

    # executor: the lease and its fence, the generation, the topology, the run, the incident
    await acl.admin.script_flush()
    await ex.heartbeat_liveness("executor", "0")
    token = await ex.acquire_lease(EXECUTOR_LEASE, "e0", 10.0)
    assert token is not None and await ex.acquire_lease(EXECUTOR_LEASE, "e0", 10.0) == token
    ex.fence = (EXECUTOR_LEASE, token)  # every scripted write from here on carries the token
    assert await ex.get_plan(PID) == b"{}" and await ex.run_states([PID]) == {PID: {}}
    assert (await ex.run_transition(PID, None, "pausing", 0))[0]
    await ex.set_active_plan(PID)
    assert await pl.active_plan_id() == PID  # the planner reads what the executor drives
    await ex.check_fence()
    new = await ex.bump_generation(await ex.generation())
    ranks = await ex.get_ranks([0, 1])
    await ex.put_ranks(new, [r.model_copy(update={"generation": new, "state": RankState.RUNNING}) for r in ranks])
    await ex.put_nodes(new, await ex.get_nodes(["node-0"]))
    placement = await ex.versioned_rank_nodes()
    assert placement[1][0] == "node-0" and await ex.versioned_rank_nodes(placement) is placement
    await ex.put_run(PID, {"recovery_step": 3, "acked": [0, 1]})
    await ex.record_committed_step(new, 3)
    assert await ex.committed_step() == 3 and (await ex.meta())[b"generation"] == str(new).encode()
    assert (await ex.incident(iid))["plan_id"] == PID
    assert (await ex.incident_transition(iid, "planned", "done", new))[0]
    assert await ex.side_effect_once(PID, "completed:done")
    assert (await ex.run_transition(PID, "pausing", "done", new))[0]
    assert (await ex.run_state(PID))["recovery_step"] == "3"
    await ex.clear_active_plan(PID)

    # sidecar: checks a command against the generation and fence token, marks a rank finished
    await acl.admin.script_flush()
    assert await sc.command_view() == (new, 4, token)
    await sc.heartbeat_liveness("sidecar", "node-0")
    assert await sc.mark_finished(0, 9) == (1, 4) and not await sc.job_finished()

    # the operator again: status, quarantine and release a node (clears its fault history)
    await acl.admin.script_flush()
    assert await op.live_services() == ["detector:0", "executor:0", "planner:0", "sidecar:node-0"]
    assert await op.lease_holder(EXECUTOR_LEASE) == "e0" and not await op.job_finished()
    assert await op.open_incidents() == [] and (await op.incident(iid))["phase"] == "done"

    def role(r: NodeRole) -> Callable[[NodeRecord | None], NodeRecord]:
        return lambda cur: cur.model_copy(update={"role": r})  # type: ignore[union-attr]

    await op.change_node("node-1", role(NodeRole.QUARANTINED), note='{"reason": "test"}')
    assert set(await op.quarantine_notes()) == {"node-1"}
    await op.change_node("node-1", role(NodeRole.ACTIVE), drop_note=True, clear_faults=True)
    assert await op.quarantine_notes() == {} and await pl.node_fault_history(["node-1"], 0.0) == {"node-1": {}}


NODES = [NodeRecord(node_id="node-0", role=NodeRole.ACTIVE, ranks=(0, 1))]


async def _custom_script(reg: Registry) -> Any:
    # a script of its own: EVALSHA on a key it may name, running a command it may not run there
    sha = await reg.r.script_load("return redis.call('HSET', KEYS[1], 'generation', 99)")
    return await reg.r.evalsha(sha, 1, reg.k.meta)


Action = Callable[[Registry], Awaitable[Any]]
_TAKE_LEASE: Action = lambda reg: reg.acquire_lease(EXECUTOR_LEASE, "intruder", 10.0)  # noqa: E731
_WRITE_RUN: Action = lambda reg: reg.put_run(PID, {"phase": "done"})  # noqa: E731
_MOVE_FENCE: Action = lambda reg: reg.r.set(reg.k.fence(EXECUTOR_LEASE), 10**9)  # noqa: E731
_SET_ACTIVE: Action = lambda reg: reg.set_active_plan(PID)  # noqa: E731
_BUMP: Action = lambda reg: reg.bump_generation(0)  # noqa: E731

# role -> what its service never does in Redis, and must not be able to
FORBIDDEN: dict[Role, dict[str, Action]] = {
    "sidecar": {
        "take the executor's lease": _TAKE_LEASE,
        "write a run state": _WRITE_RUN,
        "move the fence counter": _MOVE_FENCE,
        "set the active plan": _SET_ACTIVE,
        "write node records": lambda reg: reg.put_nodes(0, NODES),
        "rewrite the generation": lambda reg: reg.r.hset(reg.k.meta, "generation", 7),
        "write a rank record": lambda reg: reg.r.hset(reg.k.ranks, "0", b"{}"),
        "fake the detector's liveness": lambda reg: reg.heartbeat_liveness("detector", "x"),
    },
    "detector": {
        "take the executor's lease": _TAKE_LEASE,
        "bump the generation": _BUMP,
        "record an incident": lambda reg: reg.incident_transition("inc-x", None, "planned", 0),
        "write a plan": lambda reg: reg.put_plan_once(PID, b"{}"),
        "write node records": lambda reg: reg.put_nodes(0, NODES),
    },
    "planner": {
        "take the executor's lease": _TAKE_LEASE,
        "write a run state": _WRITE_RUN,
        "move the fence counter": _MOVE_FENCE,
        "set the active plan": _SET_ACTIVE,
        "overwrite the active plan key": lambda reg: reg.r.set(reg.k.active_plan, PID),
        "bump the generation (a script refused inside)": _BUMP,
        "rewrite the generation through a script of its own": _custom_script,
        "write node records": lambda reg: reg.put_nodes(0, NODES),
    },
    "executor": {
        "write a plan": lambda reg: reg.put_plan_once(PID, b"{}"),
        "record node faults": lambda reg: reg.record_node_faults(["node-0"], "inc-x", 1.0, 60.0),
        "mark a planner event handled": lambda reg: reg.mark_handled("planner", "ev-x"),
        "quarantine a node as the operator": lambda reg: reg.change_node(
            "node-1", lambda cur: cur.model_copy(update={"role": NodeRole.QUARANTINED}), note="{}"
        ),
    },
    "operator": {
        "take the executor's lease": _TAKE_LEASE,
        "write a run state": _WRITE_RUN,
        "move the fence counter": _MOVE_FENCE,
        "set the active plan": _SET_ACTIVE,
    },
}
CASES = [(role, what) for role, acts in FORBIDDEN.items() for what in acts]


@pytest.mark.parametrize("rules", ["role", "job"])
async def test_a_role_is_refused_what_other_roles_do(acl: Acl, rules: str):
    """With the role's rules every action is refused by the ACL; with the job-wide rules the
    same action goes through (the control)."""
    job = f"refuse-{acl.tag}"
    regs = {role: await acl.registry(job, role, rules=None if rules == "role" else "job") for role in FORBIDDEN}
    wrong = []
    for role, what in CASES:
        await acl.fresh_job(job)
        try:
            await FORBIDDEN[role][what](regs[role])
        except Exception as exc:  # noqa: BLE001 - sorted below: ACL refusal or not
            if rules == "job" or not _refused_by_acl(exc):
                wrong.append(f"{role}: {what}: {exc!r}"[:300])
        else:
            if rules == "role":
                wrong.append(f"{role}: {what}: allowed")
    assert wrong == []


@pytest.mark.parametrize("role", ["detector", "planner", "executor", "sidecar", "operator", "job"])
async def test_no_role_reaches_another_job_or_admin_commands(acl: Acl, role: Role):
    tag = acl.tag
    # job `a*…` must not reach job `ab…` (its key pattern is escaped, not a glob over job ids)
    own, other = f"g*{tag}", f"gx{tag}"
    await acl.fresh_job(other)
    stranger = await acl.registry(own, role, keys_of=other)
    with pytest.raises(NoPermissionError):
        await stranger.generation()
    with pytest.raises(NoPermissionError):
        await stranger.heartbeat_liveness(role if role != "job" else "executor", "0")
    with pytest.raises(NoPermissionError):
        await stranger.r.set(stranger.k.fence(EXECUTOR_LEASE), 1)
    raw = stranger.r
    for cmd in (
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("KEYS", "*"),
        ("CONFIG", "GET", "*"),
        ("SCRIPT", "FLUSH"),
        ("SELECT", "1"),
    ):
        with pytest.raises(NoPermissionError):
            await raw.execute_command(*cmd)
        await raw.ping()  # refused, not disconnected
