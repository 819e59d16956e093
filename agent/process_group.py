"""Process groups that outlive generations, for a user's ordinary torch.distributed code.

A ``RecoverableGroup`` is a ``torch.distributed.ProcessGroup`` (a Python subclass, as torch's
own Python process groups are) whose collectives go to the current generation's gloo group of
one kind (``global``, ``dp`` or ``tp``; agent/groups.py builds them per generation). A user's
``dist.all_reduce(x, group=agent.tp_group)``, ``dist.broadcast``, ``dist.all_gather``,
``dist.barrier`` (and the rest of torch.distributed's collectives), functional collectives
(torch looks a group up by ``group_name`` in its C++ registry: ``install`` registers these),
``DeviceMesh.from_group`` / DTensor, and torch's own ``DistributedDataParallel(model,
process_group=agent.dp_group, init_sync=False)`` keep working across recoveries: the object
stays, the generation under it changes.

A fault never surfaces as an exception in user code (TorchFT's managed work does the same).
A collective whose peer died, or that a pause interrupts, completes at once with the caller's
tensors as they were, and the step is marked broken (``GroupSession.mark_broken``); the agent's
optimizer wrapper then refuses to apply the step and runs the recovery instead, and
``agent.steps()`` yields the step to resume from. Each collective works on a private copy of
its tensors and copies the result back only on success: a collective abandoned on a paused
generation that completes late writes into its own copy, never into a later step's tensors
(DDP reuses its bucket buffers every step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d
from torch.futures import Future

from .groups import Groups, Interruptor, first_line, future_of, print_failure

KINDS = ("global", "dp", "tp")


class GroupSession(Protocol):
    """What a RecoverableGroup needs from the agent (RecoveryAgent implements it)."""

    interruptor: Interruptor

    @property
    def groups(self) -> Groups | None: ...

    def mark_broken(self, why: str) -> None: ...

    def step_broken(self) -> str | None: ...

    def before_collective(self, kind: str) -> None: ...


def registered_name(kind: str) -> str:
    """The name torch's group registries know a recoverable group by."""
    return f"flashrecovery_{kind}"


def members(kind: str, rank: int, world_size: int, tp: int) -> list[int]:
    """Global ranks of ``rank``'s group of ``kind``, in group-rank order (as groups.py builds
    them: dp groups gather one tp index across dp replicas, tp groups one replica's shards)."""
    dp_index, tp_index = divmod(rank, tp)
    if kind == "global":
        return list(range(world_size))
    if kind == "dp":
        return [tp_index + i * tp for i in range(world_size // tp)]
    if kind == "tp":
        return [dp_index * tp + j for j in range(tp)]
    raise ValueError(f"group kind {kind!r}: expected one of {KINDS}")


class _FutureWork(dist.Work):
    """A Work over a torch Future that the group completes (never with an error)."""

    def __init__(self, fut: Future) -> None:
        super().__init__()
        self._fut = fut

    def wait(self, timeout: Any = None) -> bool:
        self._fut.wait()
        return True

    def is_completed(self) -> bool:
        return self._fut.done()

    def is_success(self) -> bool:
        return True

    def get_future(self) -> Future:
        return self._fut


class _Call:
    """One collective in flight: finishes exactly once, by the backend or by an interrupt."""

    def __init__(
        self, session: GroupSession, what: str, outs: list[torch.Tensor], copies: list[torch.Tensor], result: Any
    ) -> None:
        self.session, self.what = session, what
        self.outs, self.copies, self.result = outs, copies, result
        self.fut: Future = Future()
        self.backend_fut: Any = None  # the backend's future, once launched
        self.by_interrupt = False
        self._lock = threading.Lock()
        self._done = False

    def finish(self, error: str | None) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if error is None:
            for out, c in zip(self.outs, self.copies):
                out.copy_(c)
        else:
            self.session.mark_broken(f"{self.what}: {error}")
        self.session.interruptor.unwatch(self)
        self.fut.set_result(self.result)

    def set(self) -> None:  # the Interruptor wakes its watchers with .set()
        self.by_interrupt = True
        bf = self.backend_fut
        if bf is not None and not bf.done():
            # left running on the paused generation: the agent keeps that generation's groups
            # alive until it ends (GlooGroupFactory.abort/reap)
            self.session.interruptor.abandon(bf)
        self.finish(f"interrupted ({self.session.interruptor.reason})")


class RecoverableGroup(dist.ProcessGroup):
    def __init__(self, session: GroupSession, kind: str, rank: int, world_size: int, tp: int) -> None:
        self.kind = kind
        self.global_ranks = members(kind, rank, world_size, tp)
        super().__init__(self.global_ranks.index(rank), len(self.global_ranks))
        self._session = session
        self._group_rank = self.global_ranks.index(rank)

    # ------------------------------------------------------------------ identity
    def getBackendName(self) -> str:
        return "flashrecovery"

    def name(self) -> str:
        return f"flashrecovery-{self.kind}"

    @property
    def group_name(self) -> str:
        # torch keeps a group's name in its C++ backends, and this group has none (its backend
        # changes per generation); functional collectives and DeviceMesh look groups up by it
        return registered_name(self.kind)

    def rank(self) -> int:
        return self._group_rank

    def size(self) -> int:
        return len(self.global_ranks)

    def shutdown(self) -> None:  # dist.destroy_process_group(): the agent owns the generations
        pass

    def abort(self) -> None:
        pass

    # ------------------------------------------------------------------ the dispatch
    def _backend(self) -> Any:
        g = self._session.groups
        if g is None:
            return None
        return {"global": g.global_pg, "dp": g.dp_pg, "tp": g.tp_pg}[self.kind]

    def _run(
        self,
        what: str,
        outs: Sequence[torch.Tensor],
        ins: Sequence[torch.Tensor],
        launch: Callable[[Any, list[torch.Tensor], list[torch.Tensor]], dist.Work],
        result: Any = None,
    ) -> dist.Work:
        """``launch(backend, in_copies, out_copies)`` starts the collective on host copies;
        ``outs`` receive the out copies on success. In-place collectives pass the same tensors
        as ``outs`` and ``ins`` (one copy serves both)."""
        session = self._session
        session.before_collective(self.kind)
        outs = list(outs)
        same = len(outs) == len(ins) and all(o is i for o, i in zip(outs, ins))
        in_copies = [t.detach().to("cpu", copy=True).contiguous() for t in ins]
        out_copies = in_copies if same else [torch.empty_like(t, device="cpu") for t in outs]
        call = _Call(session, f"{self.kind} {what}", outs, out_copies, outs if result is None else result)
        backend = self._backend()
        if session.step_broken() is not None or backend is None:
            # the step is already lost: nothing to talk to, nobody to wait for
            call.finish(f"skipped: {session.step_broken() or 'no groups (paused)'}")
            return _FutureWork(call.fut)
        if not session.interruptor.watch(call):
            call.finish(f"interrupted ({session.interruptor.reason})")
            return _FutureWork(call.fut)
        try:
            work = launch(backend, in_copies, out_copies)
        except RuntimeError as exc:  # the generation is gone (aborted) under us
            call.finish(first_line(exc))
            return _FutureWork(call.fut)
        bfut: Any = future_of(work)
        call.backend_fut = bfut

        def done(f: Any) -> None:
            try:
                f.wait()
            except Exception as exc:  # noqa: BLE001 - a peer died: the step is broken
                g = session.groups
                print_failure(g.rank if g is not None else None, call.what, exc)
                call.finish(first_line(exc))
                return
            call.finish(None)

        bfut.add_done_callback(done)
        if call.by_interrupt and not bfut.done():  # interrupted before backend_fut was set
            session.interruptor.abandon(bfut)
        return _FutureWork(call.fut)

    # ------------------------------------------------------------------ collectives
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = _reduce_opts(opts, dist.AllreduceOptions)
        return self._run("allreduce", tensors, tensors, lambda b, ins, outs: b.allreduce(ins, opts))

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        if opts is None or not isinstance(opts, dist.BroadcastOptions):
            o = dist.BroadcastOptions()
            if isinstance(opts, int):
                o.rootRank = opts
            opts = o
        return self._run("broadcast", tensors, tensors, lambda b, ins, outs: b.broadcast(ins, opts))

    def allgather(
        self, output_lists: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        opts = _opts(opts, _c10d.AllgatherOptions)
        flat_outs, shape = _flatten(output_lists)
        return self._run(
            "allgather",
            flat_outs,
            input_tensors,
            lambda b, ins, outs: b.allgather(_nest(outs, shape), ins, opts),
            result=output_lists,
        )

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        opts = _opts(opts, _c10d.AllgatherOptions)
        return self._run(
            "allgather",
            [output],
            [input],
            lambda b, ins, outs: b._allgather_base(outs[0], ins[0], opts),
            result=[output],
        )

    # torch >= 2.12 names the single-tensor forms *_single; dist.all_gather_into_tensor and
    # dist.reduce_scatter_tensor call them on the group object
    all_gather_single = _allgather_base

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        # what functional collectives' all_gather_tensor calls (one tensor or several)
        return self._pairwise("allgather", "_allgather_base", outputs, inputs, _opts(opts, _c10d.AllgatherOptions))

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        return self.reduce_scatter_tensor_coalesced([output], [input], opts)

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        opts = _reduce_opts(opts, _c10d.ReduceScatterOptions)
        return self._pairwise("reduce_scatter", "_reduce_scatter_base", outputs, inputs, opts)

    def _pairwise(
        self, what: str, op: str, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        """The coalesced single-tensor forms: one backend call per (out, in) pair (_each)."""
        return self._run(
            what, outputs, inputs, lambda b, ins, outs: _each(getattr(b, op), outs, ins, opts), result=outputs
        )

    def reduce_scatter(
        self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None
    ) -> dist.Work:
        opts = _reduce_opts(opts, _c10d.ReduceScatterOptions)
        flat_ins, shape = _flatten(input_lists)
        return self._run(
            "reduce_scatter",
            outputs,
            flat_ins,
            lambda b, ins, outs: b.reduce_scatter(outs, _nest(ins, shape), opts),
            result=outputs,
        )

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        # functional collectives' all_reduce_coalesced (gloo's needs one dtype, as torch's own)
        opts = _opts(opts, _c10d.AllreduceCoalescedOptions)
        return self._run("allreduce_coalesced", tensors, tensors, lambda b, ins, outs: b.allreduce_coalesced(ins, opts))

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> dist.Work:
        opts = _opts(opts, _c10d.AllToAllOptions)
        return self._run(
            "alltoall",
            [output],
            [input],
            lambda b, ins, outs: b.alltoall_base(outs[0], ins[0], output_split_sizes, input_split_sizes, opts),
            result=[output],
        )

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = _opts(opts, _c10d.ReduceOptions)
        return self._run("reduce", tensors, tensors, lambda b, ins, outs: b.reduce(ins, opts))

    def gather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = _opts(opts, _c10d.GatherOptions)
        flat_outs, shape = _flatten(output_lists)
        return self._run(
            "gather",
            flat_outs,
            inputs,
            lambda b, ins, outs: b.gather(_nest(outs, shape), ins, opts),
            result=output_lists,
        )

    def scatter(
        self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None
    ) -> dist.Work:
        opts = _opts(opts, _c10d.ScatterOptions)
        flat_ins, shape = _flatten(input_lists)
        return self._run(
            "scatter",
            outputs,
            flat_ins,
            lambda b, ins, outs: b.scatter(outs, _nest(ins, shape), opts),
            result=outputs,
        )

    def barrier(self, opts: Any = None) -> dist.Work:
        token = torch.zeros(1)
        return self._run("barrier", [token], [token], lambda b, ins, outs: b.allreduce(ins, dist.AllreduceOptions()))

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        return self._run(f"send to {dst}", [], tensors, lambda b, ins, outs: b.send(ins, dst, tag), result=tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        return self._run(
            f"recv from {src}",
            tensors,
            [torch.empty_like(t) for t in tensors],
            lambda b, ins, outs: b.recv(outs, src, tag),
        )


def _opts(opts: Any, cls: type) -> Any:
    """The caller's options object, or the default one (pybind overloads may pass None)."""
    return opts if isinstance(opts, cls) else cls()


def _flatten(lists: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[int]]:
    """A list of tensor lists as one list (what _run copies) and the lengths to nest it back."""
    return [t for lst in lists for t in lst], [len(lst) for lst in lists]


def _nest(flat: list[torch.Tensor], shape: list[int]) -> list[list[torch.Tensor]]:
    it = iter(flat)
    return [[next(it) for _ in range(n)] for n in shape]


def _each(op: Callable[..., dist.Work], outs: list[torch.Tensor], ins: list[torch.Tensor], opts: Any) -> dist.Work:
    """One backend call per (out, in) pair (gloo has no coalesced single-tensor forms), as one
    work that ends when the last does."""
    works = [op(o, i, opts) for o, i in zip(outs, ins)]
    if len(works) == 1:
        return works[0]
    return _FutureWork(torch.futures.collect_all([future_of(w) for w in works]))  # type: ignore[arg-type]


def _reduce_opts(opts: Any, cls: type) -> Any:
    """Options of a reducing collective; the pybind overloads may pass a bare ReduceOp."""
    if isinstance(opts, cls):
        return opts
    o = cls()
    if opts is not None:
        o.reduceOp = opts
    return o


def install(
    session: GroupSession, store: dist.Store, rank: int, world_size: int, tp: int, default: bool
) -> dict[str, RecoverableGroup]:
    """Make the recoverable groups torch.distributed groups: ``dist.get_rank(group)``,
    ``dist.get_world_size(group)`` and the collectives accept them; with ``default`` the global
    one becomes the default group, so a script's ``dist.get_rank()`` / ``dist.all_reduce(x)``
    work unchanged after ``flashrecovery.agent.init()`` instead of ``init_process_group``.
    Uses torch's group registry (``_world``), as ``new_group`` does."""
    from torch.distributed import distributed_c10d as c10d

    out = {}
    for kind in KINDS:
        pg = RecoverableGroup(session, kind, rank, world_size, tp)
        name = registered_name(kind)
        c10d._world.pg_map[pg] = ("flashrecovery", store)
        c10d._world.pg_names[pg] = name
        c10d._world.pg_group_ranks[pg] = {g: i for i, g in enumerate(pg.global_ranks)}
        c10d._world.pg_backend_config[pg] = "cpu:flashrecovery"
        # functional collectives resolve a group by name through torch's C++ registry
        _c10d._unregister_process_group(name)
        _c10d._register_process_group(name, pg)
        out[kind] = pg
    if default:
        c10d._update_default_pg(out["global"])
    return out
