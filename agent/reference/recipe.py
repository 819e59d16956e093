"""How the reference job updates its weights: optimizer, LR schedule, gradient clipping and the
statistics buffer. One construction for the agent's job and the torchrun / torchft baselines, so
they train the very same job.

Order of one applied step (``Recipe.apply``; the agent does the same in ``RecoveryAgent._apply``
with ``before_apply`` and ``scheduler`` from ``attach``): clip the reduced gradients and update
the model's grad-norm EMA, ``optimizer.step()``, ``scheduler.step()``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adamw", "sgd")


def lr_factor(warmup: int, total: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to 10 % at step ``total``."""

    def f(n: int) -> float:  # n = optimizer steps applied so far
        if n < warmup:
            return (n + 1) / warmup
        progress = min(1.0, (n - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f  # a plain function: LambdaLR.state_dict() stores None for it, nothing unpicklable


@dataclass
class Recipe:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    clip: float

    def before_apply(self, step: int) -> None:
        """On the dp-reduced gradients, so identical on every dp replica of a tp shard. The norm
        is this tp shard's (replicated parameters counted on each shard), which is fine: every
        replica of the shard computes the same one."""
        max_norm = self.clip if self.clip > 0 else math.inf  # inf: scales by exactly 1.0
        self.model.observe_grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def apply(self, step: int) -> None:
        """One optimizer step, for loops without the agent (the agent's _apply does the same)."""
        self.before_apply(step)
        self.optimizer.step()
        self.scheduler.step()

    def stateful(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler}


def build_recipe(model: torch.nn.Module, args: argparse.Namespace) -> Recipe:
    if args.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    elif args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        raise ValueError(f"--optimizer {args.optimizer!r}: one of {OPTIMIZERS}")
    sched = LambdaLR(opt, lr_factor(args.warmup_steps, args.steps))
    return Recipe(model, opt, sched, args.clip_grad)
