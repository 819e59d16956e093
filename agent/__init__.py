"""FlashRecovery in-trainer agent: keeps a training process alive through failures elsewhere.

For a user's own script (docs/integration.md)::

    import flashrecovery.agent as fr
    agent = fr.init()                                   # in place of init_process_group
    model = DDP(net, process_group=agent.dp_group, init_sync=False)
    agent.register(model, opt, scheduler=sched)
    for step in agent.steps(total):                     # in place of range(...)
        ...; opt.step()

Public API:
- ``init``, ``ManagedAgent`` (managed.py): the agent driven from a user's unchanged loop.
- ``RecoverableGroup`` (process_group.py): torch process groups that survive recoveries.
- ``StepBatches`` (data.py): a dataset's batches as a function of (step, data-parallel index).
- ``ResumableLoader`` (data.py): a stateful loader (torchdata's ``StatefulDataLoader``) read once
  per step, its position moved to a replacement and rewound with a rolled-back step.
- ``step_seed``: the per-step RNG seed the agent applies.
- ``RecoveryAgent`` (agent.py): the lower-level lifecycle (begin_step / sync_gradients / commit /
  recover) the reference job uses.
- ``Stateful``, ``TrainingState``, ``state_digest`` (transfer.py): the training-state contract.

The contracts the agent shares with the services (the sidecar channel, the commit rule, the
replica rule) live in ``flashrecovery.shared``; this package imports no service.
"""

from importlib import import_module
from typing import Any

# Everything loads on first use: importing the package (or its settings) must not import torch.
_LAZY = {
    "AgentExit": "agent",
    "RecoveryAgent": "agent",
    "StepBatches": "data",
    "ManagedAgent": "managed",
    "init": "managed",
    "step_seed": "managed",
    "RecoverableGroup": "process_group",
    "ResumableLoader": "data",
    "Stateful": "transfer",
    "TrainingState": "transfer",
    "state_digest": "transfer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AgentExit",
    "ManagedAgent",
    "RecoverableGroup",
    "RecoveryAgent",
    "ResumableLoader",
    "Stateful",
    "StepBatches",
    "TrainingState",
    "init",
    "state_digest",
    "step_seed",
]
