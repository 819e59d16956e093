"""Live state transfer from a replica to a replaced rank, with an end-to-end digest.

The training-state contract (what a replaced rank gets from a healthy replica of its shard):

- ``model.state_dict()``: parameters and persistent buffers;
- ``optimizer.state_dict()``: any torch.optim optimizer, its per-parameter state (Adam moments,
  SGD momentum, ...) and its ``param_groups`` (lr as a scheduler left it, betas, ...);
- every registered stateful object (LR scheduler, grad scaler, anything with
  ``state_dict()`` / ``load_state_dict()``, as in torch.distributed.checkpoint's ``Stateful``);
- the applied step.

Not in it, by design: the data position and the dropout RNG, which every rank re-derives from
(seed, step, rank identity) (docs/commit-protocol.md), and non-persistent buffers.

Wire format, over the global group's point-to-point ops (gloo, CPU; CUDA tensors go through a
host copy):
``[len(meta), n_tensors]`` (int64), then ``meta`` (uint8: a canonical JSON of the whole tree with
every tensor replaced by ``{"T": [index, dtype, shape]}`` and every non-tensor value encoded
exactly: floats as hex, tuples and int keys kept), then each non-empty tensor in index order,
then the sender's 32-byte blake2b digest of meta + tensor bytes. The receiver receives model
tensors straight into its own state_dict storage (shapes and dtypes match: no second copy of
the parameters), everything else into fresh buffers, then calls ``load_state_dict`` on the
optimizer and each stateful object. It then recomputes the digest from ITS OWN state, so a
piece that did not arrive, or that ``load_state_dict`` dropped or changed, fails the check.

The tensors are posted in windows (``WINDOW_BYTES``, ``WINDOW_OPS``) and each window is waited
for as one: the state is a few hundred tensors, and waiting for each on its own made the transfer
latency-bound (the reference job's 1 MB in 117 tensors took 0.25-0.34 s of a recovery on the
2-core VM, a round trip and a helper thread per tensor). A window bounds the host copies a device state needs at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..shared.settings import TRANSFER_WINDOW_BYTES
from .groups import Comm

TAG_BASE = 1000
# Posted together, then waited for together (0 bytes: one tensor at a time, the old way); the
# agent's setting transfer_window_bytes, this by default.
WINDOW_BYTES = TRANSFER_WINDOW_BYTES
WINDOW_OPS = 512


class _Window:
    """Point-to-point ops posted together and waited for as one (``Comm.wait_all``)."""

    def __init__(self, comm: Comm, what: str, limit_bytes: int) -> None:
        self.comm, self.what, self.limit = comm, what, limit_bytes
        self.works: list[Any] = []
        self.keep: list[torch.Tensor] = []  # alive until their op completed
        self.then: list[Callable[[], None]] = []
        self.bytes = 0

    def send(self, t: torch.Tensor, peer: int, tag: int) -> None:
        self._posted(self.comm.isend(t, peer, tag), t)

    def recv(self, t: torch.Tensor, peer: int, tag: int, then: Callable[[], None] | None = None) -> None:
        self._posted(self.comm.irecv(t, peer, tag), t)
        if then is not None:
            self.then.append(then)

    def _posted(self, work: Any, t: torch.Tensor) -> None:
        self.works.append(work)
        self.keep.append(t)
        self.bytes += t.numel() * t.element_size()
        if self.bytes >= self.limit or len(self.works) >= WINDOW_OPS:
            self.flush()

    def flush(self) -> None:
        self.comm.wait_all(self.works, self.what)
        for f in self.then:
            f()
        self.works, self.keep, self.then, self.bytes = [], [], [], 0


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class TransferError(RuntimeError):
    """The peer's state does not fit this rank's (other objects, shapes, or values)."""


@dataclass(frozen=True)
class TransferResult:
    peer: int
    bytes: int
    seconds: float
    digest: str
    digest_ok: bool | None  # None on the sending side
    step: int


@dataclass
class TrainingState:
    """What one rank commits and moves: model, optimizer and registered stateful objects."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stateful: Mapping[str, Stateful] = field(default_factory=dict)

    def tree(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
        }


# ---------------------------------------------------------------------- exact, canonical encoding
def _encode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return {"T": [len(tensors) - 1, str(obj.dtype).removeprefix("torch."), list(obj.shape)]}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj  # JSON keeps these apart (bool before int: True is an int)
    if isinstance(obj, float):
        return {"f": obj.hex()}  # exact, and nan / inf / -0.0 survive
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return {"t": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): pairs, in insertion order
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TransferError(
        f"cannot transfer a {type(obj).__name__} in a state_dict: use tensors "
        f"and plain values (None, bool, int, float, str, list, tuple, dict)"
    )


Slot = Callable[[int, torch.dtype, tuple[int, ...], tuple[Any, ...]], torch.Tensor]


def _decode(obj: Any, slot: Slot, path: tuple[Any, ...] = ()) -> Any:
    if isinstance(obj, list):
        return [_decode(v, slot, path + (i,)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        ((tag, v),) = obj.items()
        if tag == "T":
            return slot(v[0], getattr(torch, v[1]), tuple(v[2]), path)
        if tag == "f":
            return float.fromhex(v)
        if tag == "t":
            return tuple(_decode(x, slot, path + (i,)) for i, x in enumerate(v))
        out = {}
        for kv in v:
            k = _decode(kv[0], slot, path)
            out[k] = _decode(kv[1], slot, path + (k,))
        return out
    return obj


def encode(tree: dict[str, Any], step: int | None) -> tuple[bytes, list[torch.Tensor]]:
    """(meta, tensors): the whole state as canonical bytes plus its tensors in a fixed order."""
    tensors: list[torch.Tensor] = []
    meta = json.dumps(_encode({"step": step, **tree}, tensors), separators=(",", ":"))
    return meta.encode(), tensors


def decode_meta(meta: bytes, slot: Slot) -> dict[str, Any]:
    """The tree ``encode`` described; ``slot(index, dtype, shape, path)`` supplies each tensor."""
    return _decode(json.loads(meta), slot)


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1)  # 0-dim tensors travel and hash as one element
    return (t if t.device.type == "cpu" else t.cpu()).contiguous()


def _digest(meta: bytes, tensors: list[torch.Tensor]) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(len(meta).to_bytes(8, "little"))
    h.update(meta)
    for t in tensors:
        h.update(_host(t).view(torch.uint8).numpy())
    return h.digest()


def state_digest(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stateful: Mapping[str, Stateful] | None = None,
    step: int | None = None,
) -> str:
    """blake2b over the whole contract: every tensor's bytes and every non-tensor value."""
    meta, tensors = encode(TrainingState(model, optimizer, stateful or {}).tree(), step)
    return _digest(meta, tensors).hex()


# ---------------------------------------------------------------------- the transfer
def send_state(
    comm: Comm, dst: int, state: TrainingState, applied_step: int, window_bytes: int = WINDOW_BYTES
) -> TransferResult:
    t0 = time.perf_counter()
    meta, tensors = encode(state.tree(), applied_step)
    out = _Window(comm, f"state to {dst}", window_bytes)
    out.send(torch.tensor([len(meta), len(tensors)], dtype=torch.int64), dst, TAG_BASE)
    out.send(torch.frombuffer(bytearray(meta), dtype=torch.uint8), dst, TAG_BASE + 1)
    nbytes = 16 + len(meta)
    for i, t in enumerate(tensors):
        if t.numel():
            out.send(_host(t), dst, TAG_BASE + 2 + i)
            nbytes += t.numel() * t.element_size()
    digest = _digest(meta, tensors)
    out.send(torch.frombuffer(bytearray(digest), dtype=torch.uint8), dst, TAG_BASE + 2 + len(tensors))
    out.flush()
    return TransferResult(dst, nbytes + 32, time.perf_counter() - t0, digest.hex(), None, applied_step)


def recv_state(comm: Comm, src: int, state: TrainingState, window_bytes: int = WINDOW_BYTES) -> TransferResult:
    t0 = time.perf_counter()
    header = torch.zeros(2, dtype=torch.int64)
    comm.recv(header, src, TAG_BASE)  # the two round trips that say what follows
    meta_t = torch.empty(int(header[0]), dtype=torch.uint8)
    comm.recv(meta_t, src, TAG_BASE + 1)
    meta = meta_t.numpy().tobytes()
    own_model = state.model.state_dict()
    targets: list[torch.Tensor] = []
    in_place: set[str] = set()

    def slot(i: int, dtype: torch.dtype, shape: tuple[int, ...], path: tuple[Any, ...]) -> torch.Tensor:
        assert i == len(targets), "tensors are numbered in traversal order"
        mine = own_model.get(path[1]) if len(path) == 2 and path[0] == "model" else None
        if mine is not None and mine.dtype == dtype and tuple(mine.shape) == shape:
            in_place.add(path[1])
            targets.append(mine)  # shares storage with the parameter / buffer
        else:
            targets.append(torch.empty(shape, dtype=dtype))
        return targets[-1]

    tree = decode_meta(meta, slot)
    if len(targets) != int(header[1]):
        raise TransferError(f"state from {src}: {int(header[1])} tensors announced, {len(targets)} in its metadata")
    nbytes = 16 + len(meta)
    into = _Window(comm, f"state from {src}", window_bytes)
    for i, dst in enumerate(targets):
        if not dst.numel():
            continue
        if dst.device.type == "cpu" and dst.is_contiguous():
            into.recv(dst.reshape(-1), src, TAG_BASE + 2 + i)  # a view: lands in dst's storage
        else:  # a device tensor (or a strided one): through a host buffer, copied once it arrived
            host = torch.empty(dst.numel(), dtype=dst.dtype)
            into.recv(host, src, TAG_BASE + 2 + i, then=lambda d=dst, h=host: d.copy_(h.view(d.shape)))
        nbytes += dst.numel() * dst.element_size()
    theirs = torch.zeros(32, dtype=torch.uint8)
    into.recv(theirs, src, TAG_BASE + 2 + len(targets))
    into.flush()
    _load(state, tree, in_place == own_model.keys() and tree["model"].keys() == own_model.keys())
    ours = _digest(*encode(state.tree(), tree["step"]))
    return TransferResult(
        src, nbytes + 32, time.perf_counter() - t0, ours.hex(), bytes(theirs.tolist()) == ours, int(tree["step"])
    )


def _load(state: TrainingState, tree: dict[str, Any], model_in_place: bool) -> None:
    names, theirs = set(state.stateful), set(tree["stateful"])
    if names != theirs:
        raise TransferError(f"stateful objects differ: here {sorted(names)}, peer {sorted(theirs)}")
    try:
        if not model_in_place:
            state.model.load_state_dict(tree["model"])  # strict: names and shapes must match
        state.optimizer.load_state_dict(tree["optimizer"])
        for name, obj in state.stateful.items():
            obj.load_state_dict(tree["stateful"][name])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TransferError(f"loading the peer's state: {exc}") from exc
