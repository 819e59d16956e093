"""Communication groups built in-process per generation, and interruptible collectives.

Facts this module is built on (torch 2.13, gloo; see docs/commit-protocol.md):
- The default process group is never used. Each generation gets its own ``ProcessGroupGloo``
  objects over ``PrefixStore("flashrecovery/{job}/g{gen}/{group}", store)`` with a fresh gloo
  device, so nothing of a dead generation (addresses, pairs) is reused.
- ``abort()``/``shutdown()`` on a gloo group do NOT unblock a collective whose peer is alive but
  stopped (SIGSTOP): the gloo worker thread stays blocked. So the main thread never blocks in
  ``work.wait()`` without a limit: it waits in slices (``work.wait(timeout)``, which leaves the
  work running when the slice runs out) and looks for the control thread's interrupt (on
  ``pause``) between them; works without a future wait on an event that the work's callback OR
  the interrupt sets. An abandoned collective stays on the old group's worker thread; the old
  group is kept referenced (a graveyard) so no destructor joins a stuck thread.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .compute import ComputeInterrupt
from .settings import AgentSettings

# How long the main thread blocks in a collective before it looks for an interrupt again: the
# most a pause waits for a rank whose collective cannot finish (a peer stopped or lost).
WAIT_SLICE = datetime.timedelta(milliseconds=20)


class Interrupted(Exception):
    """The current generation was stopped; the partial step must be dropped."""


class PauseRequested(Interrupted):
    """The sidecar asked this rank to pause."""


class CollectiveError(Interrupted):
    """A collective of this rank failed (typically a peer died: 'Connection closed by peer')."""


class Interruptor:
    """Lets a control thread wake the main thread out of any collective wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._waiters: set[threading.Event] = set()
        self._abandoned: list[object] = []  # futures of collectives left running on interrupt
        self._newest_pause = -1  # newest generation a pause named; -1: none
        # Cuts the training thread's compute short on a pause (agent/compute.py).
        self.compute = ComputeInterrupt(lambda: self._reason, PauseRequested)

    @property
    def interrupted(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def interrupt(self, reason: str, generation: int | None = None) -> None:
        """``generation``: the generation a pause names (None for a failure this rank saw
        itself, which belongs to the generation it is in)."""
        with self._lock:
            if generation is not None and generation > self._newest_pause:
                self._newest_pause = generation
                self._reason = reason  # the newest pause is the one that must survive clear()
            elif self._reason is None:
                self._reason = reason
            waiters = list(self._waiters)
        for ev in waiters:
            ev.set()
        self.compute.kick()

    def clear(self, generation: int) -> bool:
        """Clear interrupts that belong to generations up to ``generation`` (the one this rank
        is entering). A pause naming a newer generation may have arrived while the rank was
        still paused: it must survive, or the rank would train on into a plan that already
        moved past it. Returns whether the interrupt is now cleared."""
        with self._lock:
            if self._newest_pause > generation:
                return False
            self._reason = None
            return True

    def watch(self, waiter: object) -> bool:
        """Have ``waiter.set()`` called on the next interrupt; False (not watched) if this rank
        is interrupted already."""
        with self._lock:
            if self._reason is not None:
                return False
            self._waiters.add(waiter)  # type: ignore[arg-type]
            return True

    def unwatch(self, waiter: object) -> None:
        with self._lock:
            self._waiters.discard(waiter)  # type: ignore[arg-type]

    def abandon(self, fut: object) -> None:
        """A collective left running on the generation being paused (see GlooGroupFactory)."""
        with self._lock:
            self._abandoned.append(fut)

    def take_abandoned(self) -> list[object]:
        with self._lock:
            out, self._abandoned = self._abandoned, []
        return out

    def check(self) -> None:
        if self._reason is not None:
            raise PauseRequested(self._reason)

    def wait(self, work: dist.Work, what: str, rank: int | None = None) -> None:
        """Wait for ``work``; raise PauseRequested on interrupt, CollectiveError on failure.

        The main thread waits on the work itself in slices of ``WAIT_SLICE``, looking for an
        interrupt between slices: a timed-out slice leaves the collective running (the work
        only stops waiting), so a rank whose peer is stopped is still free to pause within a
        slice. (Waking on the work's future callback instead made every collective hop through
        a Python callback on gloo's thread: +0.08-0.13 ms per collective on 2 ranks here,
        bench/collective_wait.py.) Works
        without a future (gloo send/recv, whose timed wait is not known to leave them usable)
        keep the callback."""
        try:
            fut = work.get_future()
        except RuntimeError:
            return self._wait_on_callback(work, what, rank)
        if self._reason is not None:
            # paused between the launch and this wait: the work is running all the same
            self.abandon(fut)
            raise PauseRequested(self._reason)
        while True:
            try:
                work.wait(WAIT_SLICE)
                return
            except RuntimeError:
                if work.is_completed():
                    # Done by now: failed (a peer died), or finished just after the slice ran
                    # out (seen: a first collective's lazy connect); the untimed wait tells.
                    self._outcome(work, what, rank)
                    return
            if self._reason is not None:
                self.abandon(fut)
                raise PauseRequested(self._reason)

    @staticmethod
    def _outcome(done: Any, what: str, rank: int | None) -> None:
        """The result of a completed work or future: nothing, or CollectiveError with its failure."""
        try:
            done.wait()
        except RuntimeError as exc:
            print_failure(rank, what, exc)
            raise CollectiveError(f"{what}: {first_line(exc)}") from exc

    def _wait_on_callback(self, work: dist.Work, what: str, rank: int | None) -> None:
        ev = threading.Event()
        with self._lock:
            paused = self._reason
            if paused is None:
                self._waiters.add(ev)
        if paused is not None:
            self.abandon(future_of(work))  # launched before the pause: it runs all the same
            raise PauseRequested(paused)
        try:
            fut = future_of(work)
            fut.add_done_callback(lambda _f: ev.set())
            ev.wait()
            if self._reason is not None and not fut.done():
                self.abandon(fut)
                raise PauseRequested(self._reason)
            self._outcome(fut, what, rank)
        finally:
            with self._lock:
                self._waiters.discard(ev)


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else repr(exc)


def print_failure(rank: int | None, what: str, exc: BaseException) -> None:
    """A failed collective or group build, printed like gloo/c10d prints it, so the sidecar's log
    classifier matches the line."""
    print(
        f"[rank{rank}]:[E ProcessGroupGloo.cpp] {what} failed: RuntimeError: {first_line(exc)}",
        file=sys.stderr,
        flush=True,
    )


def future_of(work: dist.Work) -> object:
    """The work's future; gloo send/recv works have none: a helper thread waits on those."""
    try:
        return work.get_future()
    except RuntimeError:
        return _ThreadFuture(work)


def arrival_barrier(
    store: dist.Store, key: str, size: int, abandon: Callable[[], str | None], timeout_s: float, poll_s: float = 0.005
) -> int:
    """Wait until ``size`` members have arrived at ``key``; returns the number of store polls.

    Group constructors wait in the store for every member while holding the GIL, so a member
    that died after the plan was made would pin this rank there and leave it deaf to a
    superseding pause. Counting arrivals first, in a loop that asks ``abandon`` between polls,
    keeps the rank interruptible; the constructor then only runs once everyone is alive and
    here. One ``add`` per poll: the store work per rank does not grow with the world size.
    """
    store.add(key, 1)
    t0 = time.monotonic()
    polls = 0
    delay = poll_s / 5
    while True:
        polls += 1
        # Asked before the count, so a superseding pause that arrived while the last member
        # was coming in is never ignored because the barrier happened to fill.
        why = abandon()
        if why is not None:
            raise PauseRequested(f"rebuild abandoned: {why}")
        if store.add(key, 0) >= size:
            return polls
        if time.monotonic() - t0 > timeout_s:
            raise CollectiveError(f"{key}: only {store.add(key, 0)} of {size} members arrived in {timeout_s} s")
        time.sleep(delay)
        delay = min(delay * 2, poll_s * 4)


class WorkBatch:
    """Several works waited for as one. Like a gloo send/recv work it has no future, so the
    interruptor waits on it through one helper thread (``_ThreadFuture``). Every work is waited
    for even after one failed: a work still pending on a group that is then destroyed would be
    joined by the destructor (a failed pair fails the rest at once; a stopped peer keeps the
    whole batch, and its group, in the graveyard)."""

    def __init__(self, works: list[dist.Work]) -> None:
        self.works = list(works)

    def get_future(self) -> object:
        raise RuntimeError("a batch of works has no future")

    def wait(self) -> bool:
        first: RuntimeError | None = None
        for work in self.works:
            try:
                work.wait()
            except RuntimeError as exc:
                first = first or exc
        if first is not None:
            raise first
        return True


class _ThreadFuture:
    """A future for a Work without ``get_future()``: a daemon thread blocks in ``wait()``.

    If the collective never completes the thread stays blocked with the abandoned generation.
    """

    def __init__(self, work: dist.Work) -> None:
        self._work = work
        self._done = threading.Event()
        self._exc: BaseException | None = None
        self._cbs: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="flashrecovery-wait").start()

    def _run(self) -> None:
        try:
            self._work.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._exc = exc
        with self._lock:
            self._done.set()
            cbs = list(self._cbs)
        for cb in cbs:
            cb(self)

    def add_done_callback(self, cb) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            if not self._done.is_set():
                self._cbs.append(cb)
                return
        cb(self)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self._exc is not None:
            raise self._exc


@dataclass
class Groups:
    """The groups of one generation. Model code reaches the tp group through ``Comm``."""

    generation: int
    rank: int
    world_size: int
    tp: int
    global_pg: dist.ProcessGroup | None
    dp_pg: dist.ProcessGroup | None
    tp_pg: dist.ProcessGroup | None
    build_s: float = 0.0

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_index(self) -> int:
        return self.rank % self.tp

    @property
    def dp_index(self) -> int:
        return self.rank // self.tp

    def all(self) -> list[dist.ProcessGroup]:
        return [g for g in (self.global_pg, self.dp_pg, self.tp_pg) if g is not None]


class GroupFactory(Protocol):
    """Backend abstraction: build a generation's groups, stop a generation's groups."""

    name: str

    def build(self, store: dist.Store, job: str, generation: int, rank: int, world_size: int, tp: int) -> Groups: ...

    def abort(self, groups: Groups, pending: list[object] = ()) -> None: ...

    def reap(self) -> int: ...

    def buried(self) -> int: ...


@dataclass
class GlooGroupFactory:
    name: str = "gloo"
    lazy_init: bool = True
    hostname: str = "127.0.0.1"
    timeout_s: float = 300.0  # collectives
    # The constructor waits in the store for every member with the options' timeout: bounded
    # by the rebuild timeout instead, so a member that died after the arrival barrier turns
    # into a CollectiveError within the executor's pause wait, not after 300 s.
    connect_timeout_s: float | None = None
    threads: int = 1
    graveyard: list[_Buried] = field(default_factory=list)

    def _device(self) -> object:
        # One fresh device per group: groups sharing one lazily-connecting device cross their
        # pairs (measured: the first tp allreduce times out in `unbound_buffer.cc`).
        return dist.ProcessGroupGloo.create_device(hostname=self.hostname, lazy_init=self.lazy_init)

    def _one(
        self, store: dist.Store, prefix: str, rank: int, size: int, device: object, deadline: float | None = None
    ) -> dist.ProcessGroup:
        opts = dist.ProcessGroupGloo._Options()
        # One budget for the whole build, not one per group: three groups each waiting the full
        # bound for a peer that died after the arrival barrier outlasted the sidecar's pause
        # deadline, and every survivor was then declared hung.
        connect_s = self.timeout_s if deadline is None else max(0.5, deadline - time.monotonic())
        opts._timeout = datetime.timedelta(seconds=connect_s)
        opts._devices = [device]
        opts._threads = self.threads
        pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, opts)
        if self.connect_timeout_s:
            pg.set_timeout(datetime.timedelta(seconds=self.timeout_s))
        return pg

    def build(self, store: dist.Store, job: str, generation: int, rank: int, world_size: int, tp: int) -> Groups:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.connect_timeout_s if self.connect_timeout_s else None
        base = f"flashrecovery/{job}/g{generation}"
        dp_index, tp_index = divmod(rank, tp)
        glob = self._one(store, f"{base}/global", rank, world_size, self._device(), deadline)
        dp_pg = self._one(store, f"{base}/dp{tp_index}", dp_index, world_size // tp, self._device(), deadline)
        tp_pg = self._one(store, f"{base}/tp{dp_index}", tp_index, tp, self._device(), deadline)
        return Groups(generation, rank, world_size, tp, glob, dp_pg, tp_pg, build_s=time.perf_counter() - t0)

    def abort(self, groups: Groups, pending: list[object] = ()) -> None:
        # Kept referenced while a collective abandoned on it may still run: its destructor would
        # join that stuck worker thread (holding the GIL).
        self.graveyard.append(_Buried(groups, list(pending)))
        for pg in groups.all():
            try:
                pg.abort()
            except RuntimeError:
                pass

    def reap(self) -> int:
        """Destroy the aborted generations whose abandoned collectives have all finished (their
        worker threads are idle, so the destructors do not block). Measured why this matters: a
        pair of an aborted group that still has unread bytes of the abandoned collective keeps
        its device's loop thread spinning on a level-triggered EPOLLIN; with a graveyard that
        only grew, a job at its tenth recovery had 30 loop threads, up to 17 of them running."""
        done = [b for b in self.graveyard if all(f.done() for f in b.pending)]
        if not done:
            return 0
        self.graveyard = [b for b in self.graveyard if b not in done]
        # The last references are dropped on a thread of its own: with 8 ranks the destructors
        # took 0.4-0.6 s (closing pairs to live peers), and torch releases the GIL in them, so
        # the training thread goes on meanwhile.
        n = len(done)
        threading.Thread(target=_drop, args=(done,), name="flashrecovery-reap", daemon=True).start()
        return n

    def buried(self) -> int:
        """Aborted generations not destroyed yet (their abandoned collectives still run)."""
        return len(self.graveyard)


def gloo_loop_threads() -> int:
    """Live gloo device loop threads of this process (one per device not yet destroyed)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == "gloo_tcp_loop"
        except OSError:
            pass
    return n


def _drop(buried: list[_Buried]) -> None:
    buried.clear()


@dataclass(eq=False)
class _Buried:
    groups: Groups
    pending: list[object]


@dataclass
class NcclGroupFactory:
    """Production path: ProcessGroupNCCL with ``abort()`` to break out and ``shrink()`` or a new
    communicator per generation (ncclCommInitRankConfig with a fresh unique id from the store)."""

    name: str = "nccl"

    def build(self, store: dist.Store, job: str, generation: int, rank: int, world_size: int, tp: int) -> Groups:
        raise NotImplementedError("NCCL group factory: use abort()+new communicator per generation")

    def abort(self, groups: Groups, pending: list[object] = ()) -> None:
        raise NotImplementedError("NCCL group factory")

    def reap(self) -> int:
        raise NotImplementedError("NCCL group factory")

    def buried(self) -> int:
        return 0


def factory_from_env() -> GroupFactory:
    s = AgentSettings()  # the backend is validated there (gloo | nccl)
    if s.backend == "nccl":
        return NcclGroupFactory()
    return GlooGroupFactory(lazy_init=s.gloo_lazy)


class Comm:
    """Collectives used by the training step, bound to the current generation's groups.

    The model keeps one Comm for its lifetime; recovery swaps ``groups`` underneath it. CUDA
    tensors go through host memory (gloo works on CPU tensors).
    """

    def __init__(self, interruptor: Interruptor) -> None:
        self.interruptor = interruptor
        self.groups: Groups | None = None

    def _run(self, pg: dist.ProcessGroup | None, t: torch.Tensor, what: str, op: Any = None) -> torch.Tensor:
        if pg is None or pg.size() == 1:
            return t
        host = t if t.device.type == "cpu" else t.detach().cpu()
        host = host.contiguous()
        # launched and waited for as one piece: inside the step's compute region a pause must
        # not cut in between (agent/compute.py)
        with self.interruptor.compute.suspended():
            if op is None:
                work = pg.allreduce([host])
            else:
                opts = dist.AllreduceOptions()
                opts.reduceOp = op
                work = pg.allreduce([host], opts)
            self.interruptor.wait(work, what, self._rank())
        return host if host is t else host.to(t.device)

    def _rank(self) -> int | None:
        """This rank in the current groups, for failure lines (None between generations)."""
        return self.groups.rank if self.groups else None

    def tp_allreduce(self, t: torch.Tensor) -> torch.Tensor:
        assert self.groups is not None
        return self._run(self.groups.tp_pg, t, "tp allreduce")

    def dp_allreduce(self, t: torch.Tensor) -> torch.Tensor:
        assert self.groups is not None
        return self._run(self.groups.dp_pg, t, "dp allreduce")

    def dp_allreduce_async(self, t: torch.Tensor) -> dist.Work | None:
        assert self.groups is not None and t.device.type == "cpu"
        if self.groups.dp_pg is None or self.groups.dp_pg.size() == 1:
            return None
        return self.groups.dp_pg.allreduce([t])

    def global_allreduce(self, t: torch.Tensor, what: str = "global allreduce", op: Any = None) -> torch.Tensor:
        """Sum over every rank, or `op` (a dist.ReduceOp, e.g. MAX for the in-band decision)."""
        assert self.groups is not None
        return self._run(self.groups.global_pg, t, what, op)

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.wait_all([self.isend(t, dst, tag)], f"send to {dst}")

    def recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        self.wait_all([self.irecv(t, src, tag)], f"recv from {src}")

    def isend(self, t: torch.Tensor, dst: int, tag: int) -> dist.Work:
        """Post a send on the global group; ``wait_all`` waits for it (with others)."""
        assert self.groups is not None and self.groups.global_pg is not None
        return self.groups.global_pg.send([t], dst, tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int) -> dist.Work:
        assert self.groups is not None and self.groups.global_pg is not None
        return self.groups.global_pg.recv([t], src, tag)

    def wait_all(self, works: list[dist.Work], what: str) -> None:
        """Wait for posted point-to-point works as one, interruptibly: a pause abandons them
        together (one helper thread waits on them all, instead of one thread per work)."""
        if works:
            work = works[0] if len(works) == 1 else WorkBatch(works)
            self.interruptor.wait(work, what, self._rank())
