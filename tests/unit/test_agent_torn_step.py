"""#12: an exception inside a partly applied optimizer step never becomes a clean pause (item 10);
a pause is never stuck behind a group build (found by the scenario stress run)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

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


class _StuckFactory:
    """A group build that never finishes on its own (a peer died after the arrival barrier)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.aborted: list[object] = []

    def build(self, *args):
        self.release.wait(30)
        return "late groups"

    def abort(self, groups, pending=()) -> None:
        self.aborted.append(groups)

    def buried(self) -> int:
        return 0


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_a_pause_abandons_a_group_build_that_is_stuck_connecting() -> None:
    """Survivors waited 75 s in gloo's cascaded connect timeouts, past the pause deadline, and
    were all declared hung: a newer pause must abandon the build at once."""
    fac = _StuckFactory()
    agent = RecoveryAgent(AgentSettings(rank=0, world_size=1, rebuild_timeout_s=20), factory=fac)
    agent.store = dist.HashStore()
    agent.generation = 1
    threading.Timer(0.3, agent.interruptor.interrupt, args=("pause g2 from sidecar",), kwargs={"generation": 2}).start()
    t0 = time.monotonic()
    with pytest.raises(PauseRequested, match="pause g2"):
        agent._build_groups()
    assert time.monotonic() - t0 < 5
    fac.release.set()  # the build completes later: its groups are released, never used
    deadline = time.monotonic() + 5
    while not fac.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fac.aborted == ["late groups"] and agent.groups is None


@pytest.mark.unit
def test_a_generation_whose_abandoned_collective_ends_after_its_recovery_is_reaped_at_the_next_step() -> None:
    """Reaped only at the next recovery, it kept a gloo loop thread spinning for a whole fault
    interval (the job's steady rate stepped down after each fault)."""
    from torch.futures import Future

    from flashrecovery.agent.groups import GlooGroupFactory, _Buried

    fac = GlooGroupFactory()
    agent = RecoveryAgent(AgentSettings(rank=0, world_size=1), factory=fac)
    late: Future = Future()
    fac.graveyard.append(_Buried(None, [late]))  # type: ignore[arg-type]
    agent._start_step(7)
    assert fac.buried() == 1  # still running: kept (its destructor would join a stuck thread)
    late.set_result(None)  # the peer's socket closed: the abandoned collective ended
    agent._start_step(8)
    assert fac.buried() == 0
