"""One flat buffer for the gradient all-reduce, and back: shared by the agent and the baseline
so both reduce gradients in exactly the same order (bitwise comparisons depend on it)."""

from __future__ import annotations

import torch


def flatten_grads(params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients (zeros where a parameter got none) and one host buffer holding them all."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return grads, torch.cat([g.detach().reshape(-1).cpu() for g in grads])


def unflatten_into_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[off : off + n].view_as(g))
        off += n
