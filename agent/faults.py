"""Fault injection for tests: FLASHRECOVERY_AGENT_FAULT="kind=kill,rank=2,step=12,phase=grad_sync".

kinds: kill (SIGKILL self), hang (SIGSTOP self), ecc (print an uncorrectable-ECC driver line to
stderr, then hang), exception (raise a Python error).
phases: forward, tp_collective (the step's first tensor-parallel collective is about to start;
managed agent), grad_sync (the dp allreduce is in flight), after_sync (between the sync and the
vote), vote (the vote is in flight), optimizer (the vote completed, the update is not applied).
Fires only in generation-0 processes, once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

KINDS = ("kill", "hang", "ecc", "exception")
PHASES = ("forward", "tp_collective", "grad_sync", "after_sync", "vote", "optimizer")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    rank: int
    step: int
    phase: str = "forward"

    @classmethod
    def parse(cls, spec: str) -> FaultSpec:
        kv = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
        f = cls(kv["kind"], int(kv["rank"]), int(kv["step"]), kv.get("phase", "forward"))
        if f.kind not in KINDS or f.phase not in PHASES:
            raise ValueError(f"bad FLASHRECOVERY_AGENT_FAULT {spec!r}: kinds {KINDS}, phases {PHASES}")
        return f


def parse_faults(spec: str | None) -> list[FaultSpec]:
    """Several specs may be joined with ';' (e.g. both ranks of a node)."""
    if not spec:
        return []
    return [FaultSpec.parse(s) for s in spec.split(";") if s.strip()]


class FaultInjector:
    def __init__(self, specs: list[FaultSpec], generation: int) -> None:
        self.specs = specs if generation == 0 else []
        self.fired = False

    def maybe(self, rank: int, step: int, phase: str) -> None:
        if self.fired:
            return
        for f in self.specs:
            if f.rank == rank and f.step == step and f.phase == phase:
                self.fired = True
                self.fire(f)

    @staticmethod
    def fire(f: FaultSpec) -> None:
        pid = os.getpid()
        print(
            f"flashrecovery-fault: inject kind={f.kind} rank={f.rank} step={f.step} "
            f"phase={f.phase} pid={pid} t={time.time():.6f}",
            file=sys.stderr,
            flush=True,
        )
        if f.kind == "kill":
            os.kill(pid, signal.SIGKILL)
        elif f.kind == "hang":
            os.kill(pid, signal.SIGSTOP)
        elif f.kind == "ecc":
            print(
                f"NVRM: Xid (PCI:0000:3b:00): 48, pid={pid}, name=python, An uncorrectable "
                f"double bit error (DBE) has been detected on GPU in the framebuffer at "
                f"partition 2, subpartition 0.",
                file=sys.stderr,
                flush=True,
            )
            while True:  # a device with an uncorrectable error: nothing useful happens any more
                time.sleep(1.0)
        elif f.kind == "exception":
            raise InjectedFault(f"injected exception at rank {f.rank} step {f.step} {f.phase}")
        time.sleep(60)  # SIGKILL/SIGSTOP are asynchronous to Python; never continue the step
