"""A dataset's batches as a pure function of (step, data-parallel index).

Recovery needs the data position to be re-derivable: a replacement rank resumes at step k and
must read exactly the batch its predecessor would have, and a rolled-back step must read the same
batch again. ``StepBatches`` gives step k's batch of one data-parallel replica: epoch e is a
permutation of the dataset seeded by (seed, e); the global batch of step k is the next
``batch_size * dp_size`` indices of it, and replica i takes its i-th slice. Its only state is the
step, which the training-state contract already carries (docs/integration.md), so nothing has to
be moved or checkpointed, and it is the same whichever rank computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


class StepBatches:
    def __init__(
        self,
        dataset: Sequence[Any],
        batch_size: int,
        *,
        dp_index: int,
        dp_size: int,
        seed: int = 0,
        shuffle: bool = True,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        if batch_size < 1 or dp_size < 1 or not 0 <= dp_index < dp_size:
            raise ValueError(f"batch_size {batch_size}, dp_index {dp_index}, dp_size {dp_size}")
        if len(dataset) < batch_size * dp_size:
            raise ValueError(
                f"dataset of {len(dataset)} items is smaller than one global batch ({batch_size} x {dp_size})"
            )
        self.dataset, self.batch_size = dataset, batch_size
        self.dp_index, self.dp_size = dp_index, dp_size
        self.seed, self.shuffle, self.collate_fn = seed, shuffle, collate_fn
        self.global_batch = batch_size * dp_size
        self.steps_per_epoch = len(dataset) // self.global_batch  # the remainder is dropped

    def indices(self, step: int) -> list[int]:
        """Dataset indices of step ``step`` (counted from 1) for this replica."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.dataset), generator=g)
        else:
            order = torch.arange(len(self.dataset))
        start = k * self.global_batch + self.dp_index * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def __call__(self, step: int) -> Any:
        return self.collate_fn([self.dataset[i] for i in self.indices(step)])

    def epoch(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch
