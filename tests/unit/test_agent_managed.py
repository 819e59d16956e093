"""The agent driven from a user's unchanged loop (agent/managed.py), on one rank: what
``optimizer.step()``, ``scheduler.step()`` and ``agent.steps()`` do around the user's code, and
the step-indexed data. Recovery itself is end-to-end (tests/e2e/test_examples.py)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist

from flashrecovery.agent import StepBatches, step_seed
from flashrecovery.agent.managed import ManagedAgent, settings_from_env
from flashrecovery.agent.settings import AgentSettings
from flashrecovery.agent.transfer import encode, state_digest


class Counter(torch.nn.Module):
    """A linear layer and a buffer changed by every forward (like running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.lin(x)


class RollingBack(ManagedAgent):
    """A recovery that rolls the broken step back, as the commit rule decides when not every
    rank holds its gradients (no sidecar here: recover() is simulated)."""

    recovered: list[int] = []

    def recover(self, exc: BaseException) -> int:
        self.recovered.append(self._step or -1)
        self._before_transfers()
        return self.applied_step + 1


@pytest.fixture
def master() -> Any:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))


def _agent(master: Any, cls: type[ManagedAgent] = ManagedAgent, job: str = "m") -> ManagedAgent:
    s = AgentSettings(rank=0, world_size=1, rdzv=f"127.0.0.1:{master.port}", job_id=job)
    agent = cls(s, seed=7)
    agent.open(default_group=False)
    return agent


def _train(agent: ManagedAgent, steps: int, break_at: int | None = None) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = Counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    agent.register(model, opt, scheduler=sched)
    seen_steps, draws = [], []
    broke = False
    for step in agent.steps(steps):
        seen_steps.append(step)
        draws.append(torch.rand(1).item())
        loss = model(torch.ones(2, 3)).sum()
        opt.zero_grad()
        loss.backward()
        if step == break_at and not broke:
            broke = True
            agent.mark_broken("dp allreduce: Connection closed by peer")  # a collective failed
        opt.step()
        sched.step()  # the loop's own call: the agent's once per applied step is the one
    return model, opt, sched, seen_steps, draws


@pytest.mark.timeout(60)
def test_scheduler_steps_once_per_applied_step_and_its_state_moves(master: Any) -> None:
    agent = _agent(master)
    model, opt, sched, seen, draws = _train(agent, 4)
    assert seen == [1, 2, 3, 4] and agent.applied_step == 4
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)
    assert all(not callable(v) for v in sched.state_dict().values())
    encode(agent.state.tree(), 4)  # the whole contract is transferable
    # torch's default generator is reseeded from (seed, step, rank) before every step
    want = [torch.rand(1, generator=torch.Generator().manual_seed(step_seed(7, s, 0))).item() for s in range(1, 5)]
    assert draws == want


@pytest.mark.timeout(60)
def test_a_broken_step_is_not_applied_and_runs_again_from_its_start(master: Any) -> None:
    clean = _train(_agent(master, job="clean"), 4)
    agent = _agent(master, RollingBack, job="broken")
    RollingBack.recovered = []
    model, opt, sched, seen, draws = _train(agent, 4, break_at=3)
    assert RollingBack.recovered == [3]
    assert seen == [1, 2, 3, 3, 4]  # step 3 again, after the recovery
    assert draws[2] == draws[3]  # the same random stream for the repeated step
    # the repeated step's forward counted once: the buffer went back to the step's start
    assert int(model.seen.item()) == 4
    assert state_digest(model, opt, {"scheduler": sched}, 4) == state_digest(
        clean[0], clean[1], {"scheduler": clean[2]}, 4
    )


@pytest.mark.timeout(60)
def test_the_first_step_alone_is_declared_as_a_long_phase_of_first_step_s(master: Any) -> None:
    """The detector judges a rank that has not committed yet only inside a declared phase: the
    agent declares its first step, once, before the step's first report, with first_step_s."""
    s = AgentSettings(rank=0, world_size=1, rdzv=f"127.0.0.1:{master.port}", job_id="f", first_step_s=42.0)
    agent = ManagedAgent(s, seed=7)
    agent.open(default_group=False)
    sent: list[Any] = []
    agent._send = sent.append  # type: ignore[method-assign]  # no sidecar here: what it would get
    _train(agent, 3)
    kinds = [m.type for m in sent]
    phases = [m for m in sent if m.type == "long_phase"]
    assert [(m.name, m.expected_s) for m in phases] == [("first_step", 42.0)], kinds
    assert kinds.index("long_phase") < kinds.index("step"), kinds


@pytest.mark.timeout(60)
def test_a_step_without_optimizer_step_is_an_error(master: Any) -> None:
    agent = _agent(master)
    model = Counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent.register(model, opt)
    with pytest.raises(RuntimeError, match="optimizer.step\\(\\) was not called"):
        for _ in agent.steps(2):
            pass


def test_step_batches_slice_one_global_batch_by_replica_and_repeat_per_step() -> None:
    data = list(range(100))
    replicas = [StepBatches(data, 4, dp_index=i, dp_size=3, seed=1, collate_fn=list) for i in range(3)]
    for step in (1, 2, 8, 9):  # 8 steps per epoch: 9 is the next epoch
        parts = [r.indices(step) for r in replicas]
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)) == 12  # disjoint slices of one global batch
        assert parts == [r.indices(step) for r in replicas]  # a pure function of the step
    epoch0 = {i for s in range(1, 9) for r in replicas for i in r.indices(s)}
    assert len(epoch0) == 96  # every item once per epoch (the remainder dropped)
    assert replicas[0].indices(1) != replicas[0].indices(9)  # reshuffled each epoch
    with pytest.raises(ValueError):
        StepBatches(data, 40, dp_index=0, dp_size=3)


def test_settings_come_from_torchrun_variables_without_flashrecovery_ones() -> None:
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
        "TORCHELASTIC_RUN_ID": "j1",
    }
    s = settings_from_env(env)
    assert (s.rank, s.local_rank, s.world_size, s.rdzv, s.job_id) == (3, 1, 4, "127.0.0.1:29555", "j1")
    assert s.socket is None  # no sidecar: it trains, it cannot recover


@pytest.mark.timeout(60)
def test_a_ddp_that_would_relayout_its_buckets_or_uses_another_group_is_refused(master: Any) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    agent = _agent(master, job="ddp")
    model = Counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bare = DDP(model, process_group=agent.dp_group, init_sync=False)  # find_unused_parameters off
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        agent.register(bare, opt)
    ok = agent.ddp(Counter())
    assert ok.find_unused_parameters and ok.process_group is agent.dp_group
    agent.register(ok, torch.optim.SGD(ok.parameters(), lr=0.1))


def test_a_script_tp_other_than_the_launchers_is_refused(monkeypatch: Any) -> None:
    import flashrecovery.agent as fr

    monkeypatch.setenv("FLASHRECOVERY_AGENT_TP", "1")
    monkeypatch.setenv("FLASHRECOVERY_AGENT_RANK", "0")
    with pytest.raises(ValueError, match="tp=2 but the job was launched with --tp 1"):
        fr.init(tp=2)


@pytest.mark.timeout(60)
def test_collectives_on_one_rank_groups_give_what_torch_gives(master: Any) -> None:
    agent = _agent(master, job="one")
    parts = [torch.full((3,), -1.0)]
    dist.all_gather(parts, torch.arange(3.0), group=agent.world_group)
    assert torch.equal(parts[0], torch.arange(3.0))
    t = torch.ones(2)
    dist.all_reduce(t, group=agent.dp_group)
    assert torch.equal(t, torch.ones(2))


def _loader(rank: int, dp: int = 2, n: int = 24) -> Any:
    stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
    from torch.utils.data import DistributedSampler

    ds = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    sampler = DistributedSampler(ds, num_replicas=dp, rank=rank, shuffle=True, seed=5)  # type: ignore[arg-type]
    return stateful_dataloader.StatefulDataLoader(ds, batch_size=2, sampler=sampler)


def _reads(loader: Any, k: int) -> list[list[float]]:
    return [next(loader).sum(dim=1).tolist() for _ in range(k)]


def test_a_replacement_resumes_its_own_slice_from_a_replicas_loader_position_across_epochs() -> None:
    from flashrecovery.agent import ResumableLoader

    # 24 items, 2 replicas, batches of 2: 6 steps per epoch; the fault falls in epoch 2
    dead = _reads(ResumableLoader(_loader(1)), 15)
    replica = ResumableLoader(_loader(0))
    _reads(replica, 9)
    replacement = ResumableLoader(_loader(1))
    replacement.load_state_dict(replica.state_dict())
    assert replacement.epoch == 1
    assert _reads(replacement, 6) == dead[9:15]
    assert dead[0:6] != dead[6:12], "each epoch must be shuffled anew (set_epoch)"
    with pytest.raises(TypeError, match="StatefulDataLoader"):
        ResumableLoader(torch.utils.data.DataLoader(list(range(4))))


@pytest.mark.timeout(60)
def test_a_rolled_back_step_reads_its_batch_again_and_the_position_enters_the_digest(master: Any) -> None:
    from flashrecovery.agent import ResumableLoader

    def run(agent: ManagedAgent, break_at: int | None) -> tuple[list[tuple[int, list[float]]], str]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        data = ResumableLoader(_loader(0, dp=1, n=8))
        agent.register(model, opt, stateful={"data": data})
        seen, broke = [], False
        for step in agent.steps(6):  # 4 steps per epoch: step 5 starts the second
            x = next(data)
            seen.append((step, x.sum(dim=1).tolist()))
            model(x).sum().backward()
            if step == break_at and not broke:
                broke = True
                agent.mark_broken("dp allreduce: Connection closed by peer")
            opt.step()
            opt.zero_grad()
        return seen, state_digest(model, opt, {"data": data}, 6)

    clean, clean_digest = run(_agent(master, job="loader-clean"), None)
    RollingBack.recovered = []
    broken, broken_digest = run(_agent(master, RollingBack, job="loader-broken"), 5)
    assert RollingBack.recovered == [5]
    assert [s for s, _ in broken] == [1, 2, 3, 4, 5, 5, 6]
    assert broken[4] == broken[5] == clean[4], "the repeated step must read the same batch"
    assert broken[6] == clean[5]
    assert broken_digest == clean_digest
    # the position is in the contract: the same model and optimizer, one batch apart, differ

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    at = [ResumableLoader(_loader(0, dp=1, n=8)) for _ in range(2)]
    _reads(at[0], 2)
    _reads(at[1], 3)
    assert state_digest(model, opt, {"data": at[0]}) != state_digest(model, opt, {"data": at[1]})
