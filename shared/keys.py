"""Redis key builders, defined here only.

Every key of a job carries the hash tag `{job}` so all of a job's keys land on one Redis
Cluster slot: multi-key Lua scripts and MULTI/EXEC stay legal in cluster mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

# The registry's lease and the prefix of the planner's plan ids (planner.core.plan_id_for): the
# ACL table below names keys by them.
EXECUTOR_LEASE = "executor"
PLAN_ID_PREFIX = "plan-"
_GLOB_SPECIAL = frozenset("*?[]\\")


class JobKeys:
    def __init__(self, job_id: str, namespace: str = "fr") -> None:
        if not job_id or any(c in job_id for c in "{}: "):
            raise ValueError(f"job_id {job_id!r} must be non-empty without braces, colons or spaces")
        self.job_id = job_id
        self._p = f"{namespace}:{{{job_id}}}"

    def glob(self) -> JobKeys:
        """These builders with the job's prefix escaped for a Redis glob (ACL key patterns, SCAN
        MATCH): a `*` given to a builder matches anything, one in the job id only itself (job
        `a*` must not reach job `ab`'s keys)."""
        g = copy.copy(self)
        g._p = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in self._p)
        return g

    def acl_rules(self, role: Role) -> list[str]:
        """`ACL SETUSER <user> reset on ><password> <rules...>` rules for `role` of this job
        (ROLE_GRANTS): one selector per grant, nothing outside the job's keys, no admin command.
        Needs Redis 7.0 (selectors, %R~ / %W~ key permissions)."""
        g = self.glob()
        if role == "job":
            # every command any role has, on every key of the job
            cmds = sorted({c for r in ROLES if r != "job" for grant in ROLE_GRANTS[r] for c in grant.commands.split()})
            grants: tuple[Grant, ...] = (Grant(" ".join(cmds), "RW", lambda k: (k.prefix_glob,)),)
        else:
            grants = ROLE_GRANTS[role]
        return ["resetkeys", "resetchannels", "-@all", "clearselectors", *(grant.selector(g) for grant in grants)]

    @property
    def prefix_glob(self) -> str:  # every key of the job (on a glob() copy: escaped)
        return f"{self._p}:*"

    @property
    def meta(self) -> str:  # hash: generation, committed_step, world_size, tp, dp
        return f"{self._p}:meta"

    @property
    def ranks(self) -> str:  # hash: rank -> RankRecord json
        return f"{self._p}:ranks"

    @property
    def nodes(self) -> str:  # hash: node_id -> NodeRecord json
        return f"{self._p}:nodes"

    def node_faults(self, node_id: str) -> str:  # zset of fault times, for quarantine
        return f"{self._p}:node_faults:{node_id}"

    @property
    def quarantine_notes(self) -> str:  # hash: node_id -> json {reason, at} of an operator's quarantine
        return f"{self._p}:quarantine_notes"

    def incident(self, incident_id: str) -> str:  # hash: phase, plan_id, generation, times
        return f"{self._p}:incident:{incident_id}"

    @property
    def open_incidents(self) -> str:  # set of incident ids not yet done or failed
        return f"{self._p}:incidents:open"

    def plan(self, plan_id: str) -> str:  # string: RecoveryPlan json, written once
        return f"{self._p}:plan:{plan_id}"

    def run(self, plan_id: str) -> str:  # hash: the executor's persisted state for one plan
        return f"{self._p}:run:{plan_id}"

    @property
    def open_runs(self) -> str:  # set of plan ids the executor has not finished
        return f"{self._p}:runs:open"

    @property
    def active_plan(self) -> str:  # string: plan id the executor is driving
        return f"{self._p}:plan:active"

    def lease(self, name: str) -> str:  # string with TTL: leader election
        return f"{self._p}:lease:{name}"

    def fence(self, name: str) -> str:  # counter: the fence token of the lease's newest holder
        return f"{self._p}:fence:{name}"

    def seen(self, consumer: str, event_id: str) -> str:  # idempotency marker with TTL
        return f"{self._p}:seen:{consumer}:{event_id}"

    def liveness(self, service: str, instance: str) -> str:  # TTL key backing probes
        return f"{self._p}:alive:{service}:{instance}"

    def side_effect(self, plan_id: str, name: str) -> str:  # marks a side effect done once
        return f"{self._p}:done:{plan_id}:{name}"

    @property
    def finished_ranks(self) -> str:  # hash: rank -> last step, for ranks that reported done
        return f"{self._p}:ranks:finished"


# ---------------------------------------------------------------- Redis ACL users per role
# One Redis user per kind of process (flashrecovery.secure makes them). Each grant becomes one
# ACL selector `(+cmd ... %R~pattern ...)`: Redis runs a command when one selector allows the
# command and every key it names, so a role gets each command on the keys it uses it on only.
# Scripts: EVALSHA needs read and write on every key the script is given, and every command the
# script runs is checked again against the selectors (tests/integration/test_redis_acl_roles.py):
# a role's EVALSHA grant lets it write nothing its plain grants do not.
Role = Literal["detector", "planner", "executor", "sidecar", "operator", "job"]
ROLES: tuple[Role, ...] = get_args(Role)
Access = Literal["R", "W", "RW"]  # R: the commands only read these keys, W: only write, RW: both
KeyGlobs = Callable[["JobKeys"], tuple[str, ...]]
_ACCESS_MARK: dict[Access, str] = {"R": "%R~", "W": "%W~", "RW": "~"}


@dataclass(frozen=True)
class Grant:
    commands: str  # space separated, as Redis names them (`script|load`: one subcommand)
    access: Access
    keys: KeyGlobs  # from a JobKeys.glob() copy; () for key-less commands

    def selector(self, g: JobKeys) -> str:
        cmds = [f"+{c}" for c in self.commands.split()]
        return "(" + " ".join([*cmds, *(_ACCESS_MARK[self.access] + p for p in self.keys(g))]) + ")"


def _no_keys(k: JobKeys) -> tuple[str, ...]:
    return ()


def _topology(k: JobKeys) -> tuple[str, ...]:
    return (k.meta, k.ranks, k.nodes)


def _planner_marks(k: JobKeys) -> tuple[str, ...]:  # the planner's side effects
    return (k.side_effect("*", "published"), k.side_effect("*", "escalated"))


def _executor_state(k: JobKeys) -> tuple[str, ...]:  # what the executor's scripts write
    lease = EXECUTOR_LEASE
    return (
        *_topology(k),
        k.run("*"),
        k.open_runs,
        k.active_plan,
        k.incident("*"),
        k.open_incidents,
        k.lease(lease),
        k.fence(lease),
        k.side_effect("*", "completed:*"),
    )


# connection check (PING) and MULTI/EXEC (the registry's one-moment reads and init_job)
_KEYLESS = Grant("ping multi exec", "RW", _no_keys)

ROLE_GRANTS: dict[Role, tuple[Grant, ...]] = {
    # reads the topology (admission, a snapshot per incident), writes its liveness
    "detector": (
        _KEYLESS,
        Grant("hmget hkeys hgetall", "R", _topology),
        Grant("set", "W", lambda k: (k.liveness("detector", "*"),)),
    ),
    # checks commands against the generation and the executor's fence token, marks its ranks
    # finished, writes its liveness; runs no script
    "sidecar": (
        _KEYLESS,
        Grant(
            "get hget hmget hexists hlen", "R", lambda k: (k.meta, k.ranks, k.fence(EXECUTOR_LEASE), k.finished_ranks)
        ),
        Grant("hset", "W", lambda k: (k.finished_ranks,)),
        Grant("set", "W", lambda k: (k.liveness("sidecar", "*"),)),
    ),
    # records incidents and node faults, writes each plan once, its replay markers, liveness
    "planner": (
        _KEYLESS,
        Grant(
            "get hget hgetall exists smembers zrangebyscore",
            "R",
            lambda k: (
                *_topology(k),
                k.plan("*"),
                k.incident("*"),
                k.open_incidents,
                k.node_faults("*"),
                k.seen("planner", "*"),
                *_planner_marks(k),
            ),
        ),
        Grant(
            "set",
            "W",
            lambda k: (
                k.plan(PLAN_ID_PREFIX + "*"),
                k.seen("planner", "*"),
                k.liveness("planner", "*"),
                *_planner_marks(k),
            ),
        ),
        Grant("hset", "W", lambda k: (k.incident("*"),)),
        Grant("sadd srem", "W", lambda k: (k.open_incidents,)),
        Grant("zadd zremrangebyscore expire", "W", lambda k: (k.node_faults("*"),)),
        Grant("evalsha script|load", "RW", lambda k: (k.meta, k.incident("*"), k.open_incidents, *_planner_marks(k))),
    ),
    # holds the lease, moves the generation and the topology, drives plans (run states, active
    # plan, incidents), writes its liveness
    "executor": (
        _KEYLESS,
        Grant("get hget hmget hgetall hvals hexists", "R", lambda k: (*_executor_state(k), k.plan("*"))),
        Grant("hset", "W", lambda k: (*_topology(k), k.run("*"), k.incident("*"))),
        Grant("hincrby", "RW", lambda k: (k.meta,)),
        Grant("sadd srem", "W", lambda k: (k.open_runs, k.open_incidents)),
        Grant(
            "set",
            "W",
            lambda k: (
                k.active_plan,
                k.lease(EXECUTOR_LEASE),
                k.side_effect("*", "completed:*"),
                k.liveness("executor", "*"),
            ),
        ),
        Grant("del", "W", lambda k: (k.active_plan,)),
        Grant("pexpire", "W", lambda k: (k.lease(EXECUTOR_LEASE),)),
        Grant("incr", "RW", lambda k: (k.fence(EXECUTOR_LEASE),)),
        Grant("evalsha script|load", "RW", _executor_state),
    ),
    # the run's watcher and the operator's CLI (register a job, status, node add / quarantine /
    # release, launch's end-of-job check): reads every key of the job, lists live services
    # (SCAN), writes the topology and quarantine notes, forgets a node's faults
    "operator": (
        Grant("ping multi exec scan", "RW", _no_keys),
        Grant(
            "get hget hmget hgetall hkeys hvals hlen hexists exists smembers zrangebyscore",
            "R",
            lambda k: (k.prefix_glob,),
        ),
        Grant("hsetnx hset", "W", lambda k: (*_topology(k), k.quarantine_notes)),
        Grant("hincrby", "RW", lambda k: (k.meta,)),
        Grant("hdel", "W", lambda k: (k.quarantine_notes,)),
        Grant("del", "W", lambda k: (k.node_faults("*"),)),
        Grant("evalsha script|load", "RW", lambda k: (k.meta, k.nodes, k.quarantine_notes, k.node_faults("*"))),
    ),
    # "job": one user for every process of the job (JobKeys.acl_rules builds it: every command
    # above on every key of the job)
    "job": (),
}
