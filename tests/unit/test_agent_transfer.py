"""The training-state contract: model (parameters + buffers), any optimizer's state and
param_groups, registered stateful objects (LR scheduler, ...) and the applied step move from a
replica to a fresh rank bitwise, and the digest covers every piece of it."""

from __future__ import annotations

import datetime
import multiprocessing as mp
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from flashrecovery.agent.groups import Comm, GlooGroupFactory, Interruptor
from flashrecovery.agent.transfer import (
    WINDOW_BYTES,
    TrainingState,
    TransferError,
    decode_meta,
    encode,
    recv_state,
    send_state,
    state_digest,
)

STEPS = 3


class Seen:
    """A user's stateful object: a tensor and plain values (like a data-loader position)."""

    def __init__(self, lossy: bool = False) -> None:
        self.count, self.last, self.hist, self.lossy = 0, 0.0, torch.zeros(4), lossy

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "last": self.last, "hist": self.hist.clone(), "shape": (2, 2)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.count, self.last = sd["count"], sd["last"]
        if not self.lossy:  # a buggy loader that drops a field
            self.hist = sd["hist"].clone()


def build(seed: int, lossy: bool = False, with_seen: bool = True) -> TrainingState:
    """A 2-layer MLP with a trained buffer (BatchNorm running stats), SGD with momentum and a
    warmup LambdaLR: the case that recovered 'done' yet not bitwise before the contract."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = LambdaLR(opt, lambda n: (n + 1) / 5)
    stateful: dict[str, Any] = {"scheduler": sched}
    if with_seen:
        stateful["seen"] = Seen(lossy)
    return TrainingState(model, opt, stateful)


def train(state: TrainingState, steps: int) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = state.model(x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.stateful["scheduler"].step()
        seen = state.stateful["seen"]
        seen.count, seen.last = seen.count + 1, float(loss.detach())
        seen.hist[seen.count % 4] = float(loss.detach())


def _comm(port: int, rank: int) -> Comm:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    comm = Comm(Interruptor())
    comm.groups = GlooGroupFactory(timeout_s=30).build(store, "transfer", 0, rank, 2, tp=1)
    comm._store = store  # type: ignore[attr-defined]  # keep it alive with the groups
    return comm


def _sender(port: int, out: str) -> None:
    torch.set_num_threads(1)
    state = build(seed=1)
    train(state, STEPS)
    comm = _comm(port, 0)
    # the windows need not match on the two sides (every op has its own tag): all in one
    # window, a window per ~2 tensors, one tensor at a time (the receiver: see the test)
    for window in (WINDOW_BYTES, 64, 0):
        send_state(comm, 1, state, applied_step=STEPS, window_bytes=window)
    torch.save({"tree": state.tree(), "digest": state_digest(state.model, state.optimizer, state.stateful, STEPS)}, out)


def _flat(obj: Any, pre: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{pre}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{pre}/{i}").items()}
    return {pre: obj}


def _assert_bitwise(want: dict[str, Any], have: dict[str, Any]) -> None:
    fw, fh = _flat(want), _flat(have)
    assert fw.keys() == fh.keys()
    for k, w in fw.items():
        h = fh[k]
        if isinstance(w, torch.Tensor):
            assert w.dtype == h.dtype and w.shape == h.shape and torch.equal(w, h), k
        else:
            assert type(w) is type(h) and w == h, (k, w, h)


@pytest.mark.timeout(90)
def test_sgd_momentum_scheduler_and_buffers_move_bitwise(tmp_path: Any) -> None:
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    out = str(tmp_path / "sender.pt")
    proc = mp.get_context("spawn").Process(target=_sender, args=(store.port, out), daemon=True)
    proc.start()
    try:
        comm = _comm(store.port, 1)
        fresh = build(seed=2)  # other initial values: everything must come from the sender
        weight = fresh.model[0].weight
        ptr = weight.data_ptr()
        res = recv_state(comm, 0, fresh, window_bytes=64)  # several windows, each waited for as one
        lossy = build(seed=2, lossy=True)
        res_lossy = recv_state(comm, 0, lossy)
        with pytest.raises(TransferError, match="stateful objects differ"):
            recv_state(comm, 0, build(seed=2, with_seen=False))
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    sent = torch.load(out, weights_only=False)
    want = sent["tree"]

    assert res.digest_ok is True and res.step == STEPS and res.digest == sent["digest"]
    assert fresh.model[0].weight is weight and weight.data_ptr() == ptr  # received in place
    have = fresh.tree()
    _assert_bitwise(want, have)
    assert int(have["model"]["1.num_batches_tracked"]) == STEPS  # a buffer moved by training
    assert set(have["optimizer"]["state"][0]) == {"momentum_buffer"}  # no Adam keys planted
    assert have["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * (STEPS + 1) / 5)
    assert have["stateful"]["scheduler"]["last_epoch"] == STEPS
    assert have["stateful"]["seen"]["shape"] == (2, 2)  # tuples stay tuples
    # the received state trains on exactly like the sender's
    assert state_digest(fresh.model, fresh.optimizer, fresh.stateful, STEPS) == sent["digest"]

    # a loader that drops a piece: the receiver's own state no longer hashes to the sender's
    assert res_lossy.digest_ok is False


def _digest(state: TrainingState, step: int = STEPS) -> str:
    return state_digest(state.model, state.optimizer, state.stateful, step)


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_digest_covers_every_piece_of_the_contract() -> None:
    s = build(seed=1)
    train(s, STEPS)
    base = _digest(s)
    assert _digest(s) == base
    changes = {
        "step": lambda: None,
        "param": lambda: s.model[0].weight.data.view(-1)[0].add_(1e-6),
        "buffer": lambda: s.model[1].running_mean.add_(1e-6),
        "momentum": lambda: s.optimizer.state[s.model[3].bias]["momentum_buffer"].add_(1e-6),
        "param_groups lr": lambda: s.optimizer.param_groups[0].__setitem__(
            "lr", s.optimizer.param_groups[0]["lr"] * (1 + 1e-15)
        ),
        "scheduler": lambda: setattr(s.stateful["scheduler"], "last_epoch", STEPS + 1),
        "stateful value": lambda: setattr(s.stateful["seen"], "count", 99),
    }
    seen = {base}
    for what, change in changes.items():
        s = build(seed=1)
        train(s, STEPS)
        change()
        d = _digest(s, STEPS + 1 if what == "step" else STEPS)
        assert d not in seen, f"digest blind to {what}"
        seen.add(d)
    s = build(seed=1)
    train(s, STEPS)
    missing = state_digest(s.model, s.optimizer, {"seen": s.stateful["seen"]}, STEPS)
    assert missing != base, "digest blind to a missing scheduler"


@pytest.mark.unit
def test_meta_encoding_is_exact() -> None:
    tree = {
        "model": {},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [
                {
                    "betas": (0.9, 0.999),
                    "lr": 0.1 + 0.2,
                    "eps": float("inf"),
                    "nesterov": False,
                    "fused": None,
                    "params": [0],
                }
            ],
        },
        "stateful": {"x": {"neg0": -0.0, "n": 2**70, "s": "a"}},
    }
    meta, tensors = encode(tree, 5)
    back = decode_meta(meta, lambda i, dtype, shape, path: tensors[i])
    assert back.pop("step") == 5
    _assert_bitwise(tree, back)
    assert str(back["stateful"]["x"]["neg0"]) == "-0.0"
    with pytest.raises(TransferError, match="cannot transfer a object"):
        encode({"model": {}, "optimizer": {}, "stateful": {"x": {"bad": object()}}}, 0)


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_agent_applies_clip_step_and_scheduler_once_per_step() -> None:
    """The agent owns the update: before_apply (clipping), optimizer.step(), scheduler.step(),
    once per applied step; the plain attach(model, optimizer) keeps working."""
    from flashrecovery.agent.agent import RecoveryAgent
    from flashrecovery.agent.settings import AgentSettings

    s = build(seed=1)
    agent = RecoveryAgent(AgentSettings(rank=0, world_size=1))
    sched = s.stateful["scheduler"]
    seen: list[tuple[int, float, int]] = []
    agent.attach(
        s.model,
        s.optimizer,
        scheduler=sched,
        stateful={"seen": s.stateful["seen"]},
        before_apply=lambda step: seen.append((step, s.optimizer.param_groups[0]["lr"], sched.last_epoch)),
    )
    assert set(agent.state.stateful) == {"scheduler", "seen"}
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    agent.groups = agent.comm.groups = GlooGroupFactory().build(store, "apply", 0, 0, 1, tp=1)
    g = torch.Generator().manual_seed(3)
    step = 1
    while step <= 3:
        agent.begin_step(step)
        s.model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        agent.sync_gradients()
        step = agent.commit()
    assert seen == [(n, pytest.approx(0.1 * n / 5), n - 1) for n in (1, 2, 3)]
    assert sched.last_epoch == 3 and agent.applied_step == 3
    agent.attach(s.model, s.optimizer)
    assert dict(agent.state.stateful) == {} and agent.scheduler is None
    with pytest.raises(ValueError, match="scheduler"):
        agent.attach(s.model, s.optimizer, scheduler=sched, stateful={"scheduler": sched})


def test_the_transfer_window_is_an_agent_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLASHRECOVERY_AGENT_TRANSFER_WINDOW_BYTES: the windowed transfer by default, 0 (one
    tensor at a time) when set, a negative size refused at start-up."""
    from pydantic import ValidationError

    from flashrecovery.agent.settings import AgentSettings

    assert AgentSettings().transfer_window_bytes == WINDOW_BYTES == 64 << 20
    monkeypatch.setenv("FLASHRECOVERY_AGENT_TRANSFER_WINDOW_BYTES", "0")
    assert AgentSettings().transfer_window_bytes == 0
    monkeypatch.setenv("FLASHRECOVERY_AGENT_TRANSFER_WINDOW_BYTES", "-1")
    with pytest.raises(ValidationError, match="(?i)transfer_window_bytes"):
        AgentSettings()
