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


class ResumableLoader:
    """A stateful data loader read once per step, its position part of the training state:
    torchdata's ``StatefulDataLoader``, or any loader whose ``state_dict()`` a new ``iter()``
    resumes from after ``load_state_dict()``.

        sampler = DistributedSampler(ds, num_replicas=agent.dp_size, rank=agent.dp_index, seed=0)
        data = fr.ResumableLoader(StatefulDataLoader(ds, batch_size=8, sampler=sampler))
        agent.register(model, opt, stateful={"data": data})
        for step in agent.steps(n):
            x, y = next(data)

    The agent marks every step's start (``begin_step``) and, when the commit rule rolls a step
    back, returns the loader there (``roll_back``), so a survivor reads that step's batch again;
    a replacement rank receives the position with the rest of the state and, its sampler being
    built from its own data-parallel index, reads its own slice from there. An exhausted epoch
    starts the next one; a sampler with ``set_epoch`` (DistributedSampler) gets its number,
    which is part of the state too.
    """

    def __init__(self, loader: Any) -> None:
        if not (callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))):
            raise TypeError(
                f"{type(loader).__name__} has no state_dict()/load_state_dict(): its position could not "
                "move to a replacement rank. Use torchdata's StatefulDataLoader, or fr.StepBatches"
            )
        self.loader = loader
        self.epoch = 0
        self._it: Any = None
        self._step_start: tuple[int, dict[str, Any]] | None = None

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self._set_epoch(self.epoch + 1)
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError("the loader yields no batch in a whole epoch") from None

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        sampler = getattr(self.loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_epoch(int(state["epoch"]))
        self.loader.load_state_dict(state["loader"])
        self._it = None  # the next batch comes from a new iterator, resumed from that state

    def begin_step(self, step: int) -> None:
        """Called by the agent before step ``step`` reads its first batch."""
        self._step_start = (step, self.state_dict())

    def roll_back(self, applied_step: int) -> None:
        """Called by the agent in a recovery: a step after ``applied_step`` that read batches
        was rolled back, and will read them again."""
        if self._step_start is not None and applied_step < self._step_start[0]:
            self.load_state_dict(self._step_start[1])
        self._step_start = None
