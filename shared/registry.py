"""The Redis step-state registry. Every multi-key change is one Lua script: atomic, and fenced
by the cluster generation so a writer from an old generation cannot overwrite the new one."""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from .keys import EXECUTOR_LEASE, JobKeys
from .topology import TOPOLOGY_VERSION, JobSnapshot, NodeRecord, RankRecord, meta_ints


class StaleGeneration(RuntimeError):
    """A write carried a generation older than the registry's: refused."""


class RefusedWrite(ValueError):
    """A write the registry's topology or generation rules out: a rank that is not in the job,
    a generation ahead of the registry's (nobody fenced it). Refused, nothing written."""


class FencedOut(RuntimeError):
    """A write carried a lease fence token older than the lease's newest holder's: the writer
    was deposed (its lease expired and another instance took it). Refused."""


# Prepended to every script: the last argument is the writer's lease token ('' = a writer that
# holds no lease: not fenced) and, only for a token, the last key the lease's fence counter. Both
# are popped, so the script body sees its own KEYS and ARGV. A refused write returns
# {-1, current}. A writer without a lease does not name the counter: EVALSHA needs read and write
# permission on every key it is given, and only the lease's holder may write the counter (ACL
# users per role, keys.ROLE_GRANTS).
_FENCE_PREFIX = """
local fence_token = table.remove(ARGV)
if fence_token ~= '' then
  local fence_key = table.remove(KEYS)
  local newest = tonumber(redis.call('GET', fence_key) or '0')
  if tonumber(fence_token) < newest then return {-1, newest} end
end
"""

# KEYS[1]=hash. ARGV: field/value pairs. The executor's per-plan run state.
_HSET = """
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {1, 0}
"""

# KEYS[1]=key. ARGV[1]=value ('' = delete), ARGV[2]=only if the key holds this ('' = always),
# ARGV[3]='nx' to set only if absent, ARGV[4]=ttl ms ('' = none).
_SET = """
local cur = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and cur ~= ARGV[2] then return {0, 0} end
if ARGV[3] == 'nx' and cur then return {0, 0} end
if ARGV[1] == '' then redis.call('DEL', KEYS[1]) return {1, 0} end
if ARGV[4] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
else redis.call('SET', KEYS[1], ARGV[1]) end
return {1, 0}
"""

# KEYS[1]=fence counter. Nothing but the prefix: is the caller's token still the newest?
_CHECK = "return {1, 0}"


# KEYS[1]=meta. ARGV[1]=expected generation. Bumps only if nobody bumped first.
_BUMP = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'generation') or '-1')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
redis.call('HSET', KEYS[1], 'generation', cur + 1)
return {1, cur + 1}
"""

# KEYS[1]=meta, KEYS[2]=hash. ARGV[1]=generation, then field/value pairs. Every write of the
# rank and node records moves meta's topology_version in the same step, so a reader that kept a
# copy knows it is current from one field (TOPOLOGY_VERSION).
# ARGV[2]='known': every field must exist already (rank records: the topology's ranks are fixed
# at init_job; a write for any other rank is refused). A generation ahead of the registry's is
# refused too (nobody can write for a generation that was never fenced): {2, cur}; an unknown
# field: {3, field}.
_FENCED_HSET = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'generation') or '-1')
local gen = tonumber(ARGV[1])
if gen < cur then return {0, cur} end
if gen > cur then return {2, cur} end
if ARGV[2] == 'known' then
  for i = 3, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then return {3, ARGV[i]} end
  end
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'topology_version', 1)
return {1, cur}
"""
Placement = tuple[bytes | None, dict[int, str]]  # (topology_version, rank -> node)


# KEYS[1]=meta, KEYS[2]=nodes, KEYS[3]=quarantine notes, KEYS[4]=the node's fault history.
# ARGV[1]=node id, ARGV[2]=its record as read ('' = absent), ARGV[3]=the new record, ARGV[4]=
# 'set' / 'del' the node's quarantine note (ARGV[5]) or '' to leave it, ARGV[6]='clear' to drop
# its fault history. An operator's change of one node record: written only if the record is
# still what the caller read (the executor may have moved ranks meanwhile), and the topology
# version moves so the planner re-reads it. {2, ''}: no such job.
_NODE_CAS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {2, ''} end
local cur = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if cur ~= ARGV[2] then return {0, cur} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] == 'set' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[5]) end
if ARGV[4] == 'del' then redis.call('HDEL', KEYS[3], ARGV[1]) end
if ARGV[6] == 'clear' then redis.call('DEL', KEYS[4]) end
redis.call('HINCRBY', KEYS[1], 'topology_version', 1)
return {1, ''}
"""

# KEYS[1]=meta. ARGV[1]=generation, ARGV[2]=step. The committed step only moves forward.
_COMMIT_STEP = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'generation') or '-1')
if tonumber(ARGV[1]) < cur then return {0, cur} end
local step = tonumber(redis.call('HGET', KEYS[1], 'committed_step') or '-1')
if tonumber(ARGV[2]) > step then redis.call('HSET', KEYS[1], 'committed_step', ARGV[2]) end
return {1, cur}
"""

# KEYS[1]=incident hash, KEYS[2]=meta, KEYS[3]=open set. ARGV[1]=expected phase ('' = must not
# exist), ARGV[2]=new phase, ARGV[3]=caller generation, ARGV[4]=incident id, then field pairs.
_INCIDENT_CAS = """
local cur_gen = tonumber(redis.call('HGET', KEYS[2], 'generation') or '-1')
if tonumber(ARGV[3]) < cur_gen then return {0, 'stale generation ' .. cur_gen} end
local phase = redis.call('HGET', KEYS[1], 'phase')
if ARGV[1] == '' then
  if phase then return {0, 'exists in ' .. phase} end
elseif phase ~= ARGV[1] then
  return {0, 'phase is ' .. tostring(phase)}
end
redis.call('HSET', KEYS[1], 'phase', ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'done' or ARGV[2] == 'failed' or ARGV[2] == 'superseded' then
  redis.call('SREM', KEYS[3], ARGV[4])
else
  redis.call('SADD', KEYS[3], ARGV[4])
end
return {1, ARGV[2]}
"""

# KEYS[1]=lease, KEYS[2]=its fence counter. ARGV[1]=holder, ARGV[2]=ttl ms. Renew if ours
# (the token stays), acquire if free (a new token: the counter moves, so every write of any
# earlier holder is refused from now on). Returns the holder's token, or 0.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if cur then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return token
"""


def _j(obj: Any) -> bytes:
    return orjson.dumps(obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj)


class _Script(Protocol):
    """A fenced Lua script, called with its keys and arguments (Registry._script)."""

    def __call__(self, keys: list[str], args: list[Any]) -> Awaitable[Any]: ...


class Registry:
    def __init__(self, client: aioredis.Redis, job_id: str) -> None:
        # redis-py's asyncio client is typed `Awaitable[T] | T` per command (one class serves
        # both APIs): the registry's own methods carry the types instead.
        self.r: Any = client
        self.k = JobKeys(job_id)
        self.job_id = job_id
        self._bump = self._script(_BUMP)
        self._fenced_hset = self._script(_FENCED_HSET)
        self._commit = self._script(_COMMIT_STEP)
        self._incident_cas = self._script(_INCIDENT_CAS)
        self._hset = self._script(_HSET)
        self._set = self._script(_SET)
        self._check = self._script(_CHECK)
        self._node_cas = self._script(_NODE_CAS)
        self._lease = client.register_script(_LEASE)
        # Set by a lease holder (the executor): (lease name, its token). Every scripted write
        # then carries the token and is refused once a newer holder took the lease.
        self.fence: tuple[str, int] | None = None

    def _script(self, body: str) -> _Script:
        script = self.r.register_script(_FENCE_PREFIX + body)

        async def call(keys: list[str], args: list[Any]) -> Any:
            if self.fence is None:
                res = await script(keys=keys, args=[*args, ""])
            else:
                name, token = self.fence
                res = await script(keys=[*keys, self.k.fence(name)], args=[*args, token])
                if isinstance(res, list) and res and res[0] == -1:
                    raise FencedOut(
                        f"write with fence token {token} refused: the {name} lease's newest token is {res[1]}"
                    )
            return res

        return call

    @classmethod
    def from_url(cls, url: str, job_id: str) -> Registry:
        return cls(aioredis.Redis.from_url(url), job_id)

    async def close(self) -> None:
        await self.r.aclose()

    # ------------------------------------------------------------ topology and snapshot
    async def init_job(self, snap: JobSnapshot) -> bool:
        """Write a job's initial topology (generation 0). Idempotent: an existing job is kept.
        -> whether this call created it."""
        created = await self.r.hsetnx(self.k.meta, "generation", snap.generation)
        if not created:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            self.k.meta,
            mapping={
                "committed_step": snap.committed_step,
                "world_size": snap.world_size,
                "dp": snap.dp,
                "tp": snap.tp,
                "pp": snap.pp,
            },
        )
        pipe.hset(self.k.ranks, mapping={str(r.rank): _j(r) for r in snap.ranks})
        pipe.hset(self.k.nodes, mapping={n.node_id: _j(n) for n in snap.nodes})
        pipe.hincrby(self.k.meta, TOPOLOGY_VERSION, 1)
        await pipe.execute()
        return True

    async def snapshot(self) -> JobSnapshot:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.k.meta)
        pipe.hgetall(self.k.ranks)
        pipe.hgetall(self.k.nodes)
        meta, ranks, nodes = await pipe.execute()
        if not meta:
            raise LookupError(f"job {self.job_id!r} has no topology in the registry")
        m = meta_ints(meta)
        rank_recs = sorted((RankRecord.model_validate_json(v) for v in ranks.values()), key=lambda r: r.rank)
        node_recs = sorted((NodeRecord.model_validate_json(v) for v in nodes.values()), key=lambda n: n.node_id)
        return JobSnapshot(
            job_id=self.job_id,
            generation=m["generation"],
            committed_step=m.get("committed_step", -1),
            world_size=m["world_size"],
            dp=m["dp"],
            tp=m["tp"],
            pp=m.get("pp", 1),
            ranks=tuple(rank_recs),
            nodes=tuple(node_recs),
        )

    # ------------------------------------------------------------ topology reads for the services
    async def meta(self) -> dict[bytes, bytes]:
        """The job's meta hash as stored (empty: no topology registered)."""
        meta: dict[bytes, bytes] = await self.r.hgetall(self.k.meta)
        return meta

    async def topology_version(self) -> bytes | None:
        """Moves on every write of rank or node records: a warm copy is current while it holds."""
        version: bytes | None = await self.r.hget(self.k.meta, TOPOLOGY_VERSION)
        return version

    async def topology_rows(self) -> tuple[dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes]]:
        """(meta, rank records, node records) as stored, read in one MULTI: the planner parses
        them into arrays without a pydantic object per rank."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.k.meta)
        pipe.hgetall(self.k.ranks)
        pipe.hgetall(self.k.nodes)
        meta, ranks, nodes = await pipe.execute()
        return meta, ranks, nodes

    async def admission_view(self) -> tuple[int | None, int | None, bytes | None]:
        """(generation, world size, topology version); None where the job has no topology."""
        gen, world, version = await self.r.hmget(self.k.meta, ["generation", "world_size", TOPOLOGY_VERSION])
        return (None if gen is None else int(gen), None if world is None else int(world), version)

    async def node_ids(self) -> frozenset[str]:
        return frozenset(n.decode() for n in await self.r.hkeys(self.k.nodes))

    async def command_view(self) -> tuple[int | None, int | None, int | None]:
        """(generation, world size, newest executor fence token) in one round trip: what a
        sidecar checks a command against."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.k.meta, ["generation", "world_size"])
        pipe.get(self.k.fence(EXECUTOR_LEASE))
        (gen, world), fence = await pipe.execute()
        return (
            None if gen is None else int(gen),
            None if world is None else int(world),
            None if fence is None else int(fence),
        )

    async def generation(self) -> int:
        v = await self.r.hget(self.k.meta, "generation")
        return int(v) if v is not None else -1

    async def bump_generation(self, expected: int) -> int:
        """Compare-and-set expected -> expected+1. Returns the new generation, or raises
        StaleGeneration when someone else already moved it."""
        ok, gen = await self._bump(keys=[self.k.meta], args=[expected])
        if not ok:
            raise StaleGeneration(f"generation is {gen}, expected {expected}")
        return int(gen)

    async def _fenced(self, key: str, generation: int, pairs: dict[str, bytes], known_only: bool = False) -> None:
        if not pairs:
            return
        args: list[Any] = [generation, "known" if known_only else ""]
        for f, v in pairs.items():
            args += [f, v]
        ok, cur = await self._fenced_hset(keys=[self.k.meta, key], args=args)
        if ok == 0:
            raise StaleGeneration(f"write from generation {generation} refused: registry at {cur}")
        if ok == 2:
            raise RefusedWrite(f"write for generation {generation} refused: ahead of the registry's {cur}")
        if ok == 3:
            what = cur.decode() if isinstance(cur, bytes) else cur
            raise RefusedWrite(f"write for rank {str(what)[:40]} refused: not in the job's topology")

    async def put_ranks(self, generation: int, recs: list[RankRecord]) -> None:
        """Rank records of the topology's own ranks only, for the registry's generation (an older
        one is StaleGeneration; an unknown rank or a generation ahead is RefusedWrite)."""
        ahead = [r.rank for r in recs if r.generation > generation]
        if ahead:
            raise RefusedWrite(f"rank records {ahead[:5]} claim a generation ahead of {generation}")
        await self._fenced(self.k.ranks, generation, {str(r.rank): _j(r) for r in recs}, known_only=True)

    async def get_ranks(self, ranks: Iterable[int]) -> list[RankRecord]:
        """Only the named rank records (HMGET): reads that grow with a restart set, not the job."""
        wanted = [str(r) for r in ranks]
        if not wanted:
            return []
        raw = await self.r.hmget(self.k.ranks, wanted)
        return [RankRecord.model_validate_json(v) for v in raw if v is not None]

    async def versioned_rank_nodes(self, kept: Placement | None = None) -> Placement:
        """(topology_version, every rank's node), without a pydantic object per rank: what a
        phase needs from the whole job at 100k ranks (the records were validated when written).
        Given the copy an earlier call returned, returns it unchanged when no rank or node record
        was written since: one HGET instead of parsing every record."""
        if kept is not None and kept[0] is not None:
            if await self.r.hget(self.k.meta, TOPOLOGY_VERSION) == kept[0]:
                return kept
        pipe = self.r.pipeline(transaction=True)  # the version and the records of one moment
        pipe.hget(self.k.meta, TOPOLOGY_VERSION)
        pipe.hvals(self.k.ranks)
        version, raw = await pipe.execute()
        return version, self._parse_rank_nodes(raw)

    @staticmethod
    def _parse_rank_nodes(raw: list[bytes]) -> dict[int, str]:
        # The cyclic GC is paused meanwhile: the short-lived dicts hold no cycles and
        # collections would double the cost.
        pick = itemgetter("rank", "node_id")
        paused = gc.isenabled()
        gc.disable()
        try:
            return dict(pick(orjson.loads(v)) for v in raw)
        finally:
            if paused:
                gc.enable()

    async def get_nodes(self, node_ids: Iterable[str]) -> list[NodeRecord]:
        """Only the named node records (HMGET)."""
        wanted = list(node_ids)
        if not wanted:
            return []
        raw = await self.r.hmget(self.k.nodes, wanted)
        return [NodeRecord.model_validate_json(v) for v in raw if v is not None]

    async def put_nodes(self, generation: int, recs: list[NodeRecord]) -> None:
        await self._fenced(self.k.nodes, generation, {n.node_id: _j(n) for n in recs})

    async def change_node(
        self,
        node_id: str,
        change: Callable[[NodeRecord | None], NodeRecord],
        *,
        note: str | None = None,
        drop_note: bool = False,
        clear_faults: bool = False,
        attempts: int = 5,
    ) -> NodeRecord:
        """An operator's change of one node record (add a spare, quarantine, release):
        `change(current or None) -> new record` (a pure function that raises ValueError to refuse),
        written by compare-and-set so a concurrent write by the executor is never lost: on a
        conflict the record is read again and `change` re-applied, at most `attempts` times.
        `note` sets the node's quarantine note, `drop_note` removes it, `clear_faults` forgets the
        node's fault history (the planner's quarantine count starts again)."""
        for _ in range(attempts):
            raw = await self.r.hget(self.k.nodes, node_id)
            new = change(NodeRecord.model_validate_json(raw) if raw else None)
            op = "set" if note is not None else "del" if drop_note else ""
            ok, _cur = await self._node_cas(
                keys=[self.k.meta, self.k.nodes, self.k.quarantine_notes, self.k.node_faults(node_id)],
                args=[node_id, raw or b"", _j(new), op, note or "", "clear" if clear_faults else ""],
            )
            if ok == 2:
                raise LookupError(f"job {self.job_id!r} has no topology in the registry (register it first)")
            if ok == 1:
                return new
        raise StaleGeneration(f"node {node_id} kept changing under {attempts} attempts: try again")

    async def quarantine_notes(self) -> dict[str, str]:
        """node id -> the operator's note (json: reason, at) for nodes quarantined by hand."""
        raw = await self.r.hgetall(self.k.quarantine_notes)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def committed_step(self) -> int:
        """The last step the registry knows every rank applied (-1: none)."""
        v = await self.r.hget(self.k.meta, "committed_step")
        return int(v) if v is not None else -1

    async def record_committed_step(self, generation: int, step: int) -> None:
        ok, cur = await self._commit(keys=[self.k.meta], args=[generation, step])
        if not ok:
            raise StaleGeneration(f"commit from generation {generation} refused: registry at {cur}")

    # ------------------------------------------------------------ incidents and plans
    async def incident_transition(
        self, incident_id: str, expected: str | None, new: str, generation: int, **fields: Any
    ) -> tuple[bool, str]:
        """Atomic compare-and-set of an incident's phase. Exactly one of several concurrent
        writers expecting the same phase wins; the others get (False, why)."""
        return await self._phase_cas(
            self.k.incident(incident_id), self.k.open_incidents, incident_id, expected, new, generation, fields
        )

    async def run_transition(
        self, plan_id: str, expected: str | None, new: str, generation: int, **fields: Any
    ) -> tuple[bool, str]:
        """The same compare-and-set for the executor's state of one plan."""
        return await self._phase_cas(self.k.run(plan_id), self.k.open_runs, plan_id, expected, new, generation, fields)

    async def _phase_cas(
        self, key: str, index: str, member: str, expected: str | None, new: str, generation: int, fields: dict[str, Any]
    ) -> tuple[bool, str]:
        args: list[Any] = [expected or "", new, generation, member]
        for f, v in fields.items():
            args += [f, v if isinstance(v, (str, bytes, int, float)) else orjson.dumps(v)]
        ok, why = await self._incident_cas(keys=[key, self.k.meta, index], args=args)
        return bool(ok), why.decode() if isinstance(why, bytes) else str(why)

    async def incident(self, incident_id: str) -> dict[str, str]:
        raw = await self.r.hgetall(self.k.incident(incident_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def open_incidents(self) -> list[str]:
        return sorted(m.decode() for m in await self.r.smembers(self.k.open_incidents))

    async def put_plan_once(self, plan_id: str, plan_json: bytes) -> bool:
        """First writer wins; a replayed incident cannot produce a second plan."""
        return bool(await self.r.set(self.k.plan(plan_id), plan_json, nx=True))

    async def get_plan(self, plan_id: str) -> bytes | None:
        raw: bytes | None = await self.r.get(self.k.plan(plan_id))
        return raw

    async def active_plan_id(self) -> str | None:
        """The plan the executor is driving (set_active_plan), if any."""
        v = await self.r.get(self.k.active_plan)
        return v.decode() if v else None

    # ------------------------------------------------------------ per-node fault history
    async def record_node_faults(self, nodes: Iterable[str], incident_id: str, at: float, window_s: float) -> None:
        """Each node's faults keyed by incident id (a replay adds nothing), trimmed to the
        quarantine window and expiring after it."""
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            key = self.k.node_faults(node)
            pipe.zadd(key, {incident_id: at})
            pipe.zremrangebyscore(key, "-inf", at - window_s)
            pipe.expire(key, int(window_s) + 60)
        await pipe.execute()

    async def node_fault_history(self, nodes: Sequence[str], since: float) -> dict[str, dict[str, float]]:
        """node -> {incident id: time} of the faults recorded since `since`."""
        pipe = self.r.pipeline(transaction=False)
        for n in nodes:
            pipe.zrangebyscore(self.k.node_faults(n), since, "+inf", withscores=True)
        rows = await pipe.execute()
        return {n: {m.decode(): float(t) for m, t in row} for n, row in zip(nodes, rows)}

    # ------------------------------------------------------------ leases, idempotency, liveness
    async def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return await self.acquire_lease(name, holder, ttl_s) is not None

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Acquire or renew; -> the holder's fence token (renewing keeps it, a new holder gets a
        higher one), or None when another instance holds the lease."""
        token = int(await self._lease(keys=[self.k.lease(name), self.k.fence(name)], args=[holder, int(ttl_s * 1000)]))
        return token or None

    async def check_fence(self) -> None:
        """Raises FencedOut when this holder's token is no longer the newest (before an act
        outside Redis, such as publishing a command)."""
        await self._check(keys=[], args=[])

    # ------------------------------------------------------------ the executor's own state
    async def run_state(self, plan_id: str) -> dict[str, str]:
        """One plan's run state (phase, timestamps, decisions), decoded."""
        raw = await self.r.hgetall(self.k.run(plan_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def run_states(self, plan_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """run_state of several plans in one round trip ({} for a plan never started)."""
        pipe = self.r.pipeline(transaction=False)
        for pid in plan_ids:
            pipe.hgetall(self.k.run(pid))
        rows = await pipe.execute()
        return {pid: {k.decode(): v.decode() for k, v in raw.items()} for pid, raw in zip(plan_ids, rows)}

    async def put_run(self, plan_id: str, fields: Mapping[str, Any]) -> None:
        """Fields of one plan's run state (fenced by the lease token)."""
        args: list[Any] = []
        for f, v in fields.items():
            args += [f, v if isinstance(v, (str, bytes, int, float)) else orjson.dumps(v)]
        if args:
            await self._hset(keys=[self.k.run(plan_id)], args=args)

    async def set_active_plan(self, plan_id: str) -> None:
        await self._set(keys=[self.k.active_plan], args=[plan_id, "", "", ""])

    async def clear_active_plan(self, plan_id: str) -> None:
        """Only if it still names `plan_id`: a plan that ends late never clears a newer one's."""
        await self._set(keys=[self.k.active_plan], args=["", plan_id, "", ""])

    async def lease_holder(self, name: str) -> str | None:
        v = await self.r.get(self.k.lease(name))
        return v.decode() if v else None

    async def handled(self, consumer: str, event_id: str) -> bool:
        """Whether `consumer` finished handling the event (mark_handled). Checked before and
        marked after the handling: a consumer killed half-way handles the redelivery again."""
        return bool(await self.r.exists(self.k.seen(consumer, event_id)))

    async def mark_handled(self, consumer: str, event_id: str, ttl_s: int = 3600) -> None:
        await self.r.set(self.k.seen(consumer, event_id), 1, ex=ttl_s)

    async def side_effect_once(self, plan_id: str, name: str) -> bool:
        ok, _ = await self._set(
            keys=[self.k.side_effect(plan_id, name)], args=[repr(time.time()), "", "nx", 86400 * 1000]
        )
        return bool(ok)

    async def side_effect_done(self, plan_id: str, name: str) -> bool:
        """Whether side_effect_once(plan_id, name) already happened."""
        return bool(await self.r.exists(self.k.side_effect(plan_id, name)))

    async def heartbeat_liveness(self, service: str, instance: str, ttl_s: float = 10.0) -> None:
        await self.r.set(self.k.liveness(service, instance), time.time(), px=int(ttl_s * 1000))

    async def live_services(self) -> list[str]:
        pattern = self.k.glob().liveness("*", "*")  # a job id with `*` in it must not match others
        return sorted([k.decode().split(":alive:", 1)[1] async for k in self.r.scan_iter(match=pattern, count=1000)])

    # ------------------------------------------------------------ job completion
    async def mark_finished(self, rank: int, step: int) -> tuple[int, int]:
        """Record that `rank` finished training at `step`. Returns (ranks finished, world size):
        a finished rank stays up as a replica until every rank has finished, so a fault in the
        last step still has a source to copy from. A rank outside the topology: RefusedWrite."""
        if not await self.r.hexists(self.k.ranks, str(rank)):
            raise RefusedWrite(f"rank {rank} is not in the job's topology")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k.finished_ranks, str(rank), step)
        pipe.hlen(self.k.finished_ranks)
        pipe.hget(self.k.meta, "world_size")
        _, n, world = await pipe.execute()
        return int(n), int(world or 0)

    async def job_finished(self) -> bool:
        """Every rank of the job has reported done."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k.finished_ranks)
        pipe.hget(self.k.meta, "world_size")
        n, world = await pipe.execute()
        return world is not None and int(n) >= int(world) > 0
