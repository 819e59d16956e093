"""#12 item 10: an exception inside a partly applied optimizer step never becomes a clean pause."""

from __future__ import annotations

import pytest
import torch

from flashrecovery.agent.agent import RecoveryAgent
from flashrecovery.agent.groups import PauseRequested
from flashrecovery.agent.settings import AgentSettings


class TornSGD(torch.optim.SGD):
    """Updates the first parameter, then fails: the state is half old, half new."""

    def step(self, closure=None):  # type: ignore[override]
        p = self.param_groups[0]["params"][0]
        with torch.no_grad():
            p.add_(1.0)
        raise RuntimeError("device error inside the optimizer update")


def _agent(opt_cls: type) -> tuple[RecoveryAgent, torch.nn.Module]:
    agent = RecoveryAgent(AgentSettings(rank=0, world_size=1, command_timeout_s=0.5))
    model = torch.nn.Linear(4, 2)
    agent.attach(model, opt_cls(model.parameters(), lr=0.1))
    agent._step = agent.grads_step = 1  # gradients of step 1 reduced: ready to commit
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return agent, model


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_exception_inside_optimizer_step_is_reraised_even_with_a_pause_pending() -> None:
    agent, _ = _agent(TornSGD)
    agent.interruptor.interrupt("pause g1 from sidecar", generation=1)  # a pause is pending
    with pytest.raises(RuntimeError) as info:
        agent.commit()
    exc = info.value
    with pytest.raises(RuntimeError) as again:
        agent.recover(exc)
    assert again.value is exc  # the original error: the process leaves and is replaced
    assert agent.applied_step == 0


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_exception_outside_the_update_still_pauses_when_a_pause_is_pending() -> None:
    agent, _ = _agent(torch.optim.SGD)
    agent.interruptor.interrupt("pause g1 from sidecar", generation=1)
    # An error in the forward pass of step 1 (nothing applied): a clean pause. Without a
    # sidecar the paused rank then waits for `recover` and gives up after command_timeout_s.
    with pytest.raises(RuntimeError, match="no command from the sidecar"):
        agent.recover(ValueError("shape mismatch in forward"))
    assert agent.applied_step == 0
    assert isinstance(PauseRequested("x"), Exception)
