"""Live state transfer from a replica to a replaced rank, tensor by tensor, with a digest.

Order (both sides walk the same model, so no metadata crosses the wire): a header
[applied_step, n_tensors], then every parameter, then per parameter the optimizer state
(step, exp_avg, exp_avg_sq), then the 32-byte blake2b digest of every tensor's bytes in order.
Each tensor is sent from and received into its own storage: no second full copy of the state.

Data position and dropout RNG are not transferred: both are derived from (seed, step, rank), and
the RNG state of a replica is not the replaced rank's (dropout inside the tp region uses a per-rank
stream, and the replica's generator has already moved on), so copying it would be wrong.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .groups import Comm

TAG_BASE = 1000


@dataclass(frozen=True)
class TransferResult:
    peer: int
    bytes: int
    seconds: float
    digest: str
    digest_ok: bool | None  # None on the sending side
    step: int


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam(W) state tensors exactly as the first ``step()`` would, so a fresh rank has
    buffers to receive into (same dtypes, shapes and devices)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def state_tensors(model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor of the rank's training state, in a fixed order."""
    params = [p for p in model.parameters()]
    for p in params:
        yield p.data
    for p in params:
        st = optimizer.state[p]
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in st:
                yield st[key]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.dim() == 0 else t


def _update(h: "hashlib._Hash", t: torch.Tensor) -> None:
    h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy() if t.dim() else
             t.detach().reshape(1).cpu().view(torch.uint8).numpy())


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.blake2b(digest_size=32)
    for t in state_tensors(model, optimizer):
        _update(h, t)
    return h.hexdigest()


def send_state(comm: Comm, dst: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               applied_step: int) -> TransferResult:
    t0 = time.perf_counter()
    tensors = list(state_tensors(model, optimizer))
    header = torch.tensor([applied_step, len(tensors)], dtype=torch.int64)
    comm.send(header, dst, TAG_BASE)
    h = hashlib.blake2b(digest_size=32)
    nbytes = header.numel() * 8
    for i, t in enumerate(tensors):
        src = _flat(t.detach())
        host = src if src.device.type == "cpu" else src.cpu()
        comm.send(host.contiguous(), dst, TAG_BASE + 1 + i)
        _update(h, t)
        nbytes += t.numel() * t.element_size()
    digest = h.digest()
    comm.send(torch.frombuffer(bytearray(digest), dtype=torch.uint8), dst, TAG_BASE + 1 + len(tensors))
    return TransferResult(dst, nbytes + 32, time.perf_counter() - t0, digest.hex(), None,
                          applied_step)


def recv_state(comm: Comm, src: int, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> TransferResult:
    t0 = time.perf_counter()
    ensure_optimizer_state(optimizer)
    tensors = list(state_tensors(model, optimizer))
    header = torch.zeros(2, dtype=torch.int64)
    comm.recv(header, src, TAG_BASE)
    step, n = int(header[0]), int(header[1])
    if n != len(tensors):
        raise RuntimeError(f"state transfer from {src}: {n} tensors announced, {len(tensors)} here")
    h = hashlib.blake2b(digest_size=32)
    nbytes = header.numel() * 8
    for i, t in enumerate(tensors):
        dst = _flat(t.data if isinstance(t, torch.nn.Parameter) else t)
        if dst.device.type == "cpu" and dst.is_contiguous():
            comm.recv(dst, src, TAG_BASE + 1 + i)
        else:
            host = torch.empty(dst.shape, dtype=dst.dtype)
            comm.recv(host, src, TAG_BASE + 1 + i)
            dst.copy_(host)
        _update(h, t)
        nbytes += t.numel() * t.element_size()
    theirs = torch.zeros(32, dtype=torch.uint8)
    comm.recv(theirs, src, TAG_BASE + 1 + len(tensors))
    ours = h.digest()
    return TransferResult(src, nbytes + 32, time.perf_counter() - t0, ours.hex(),
                          bytes(theirs.tolist()) == ours, step)
