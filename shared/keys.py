"""Redis key builders, defined here only.

Every key of a job carries the hash tag `{job}` so all of a job's keys land on one Redis
Cluster slot: multi-key Lua scripts and MULTI/EXEC stay legal in cluster mode.
"""

from __future__ import annotations


class JobKeys:
    def __init__(self, job_id: str, namespace: str = "fr") -> None:
        if not job_id or any(c in job_id for c in "{}: "):
            raise ValueError(f"job_id {job_id!r} must be non-empty without braces, colons or spaces")
        self.job_id = job_id
        self._p = f"{namespace}:{{{job_id}}}"

    def acl_rules(self) -> list[str]:
        """`ACL SETUSER <user> on ><password> <rules...>` rules for a service of this job: every
        key of the job (this prefix) and nothing else, the data, scripting and transaction
        commands the registry uses, no admin or dangerous command (FLUSHALL, KEYS, CONFIG, ...)."""
        return [
            "resetkeys",
            f"~{self._p}:*",
            "resetchannels",
            "-@all",
            "+@read",
            "+@write",
            "+@scripting",
            "+@transaction",
            "+@connection",
            "-@dangerous",
            "-@admin",
        ]

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
