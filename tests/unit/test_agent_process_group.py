"""Recoverable process groups: a user's ordinary torch.distributed calls and torch's own DDP run
on them, and a fault or a pause completes a collective at once, tensors untouched, the step
marked broken (never an exception in user code)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from flashrecovery.agent.groups import GlooGroupFactory, Groups, Interruptor
from flashrecovery.agent.process_group import RecoverableGroup, install, members


class Session:
    """The agent's side of the GroupSession protocol, without an agent."""

    def __init__(self) -> None:
        self.interruptor = Interruptor()
        self.groups: Groups | None = None
        self.broken: str | None = None
        self.kinds: list[str] = []

    def mark_broken(self, why: str) -> None:
        self.broken = self.broken or why

    def step_broken(self) -> str | None:
        return self.broken

    def before_collective(self, kind: str) -> None:
        self.kinds.append(kind)


def _store(port: int) -> dist.Store:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))


def _worker(port: int, rank: int, out: str) -> None:
    torch.set_num_threads(1)
    store = _store(port)
    s = Session()
    s.groups = GlooGroupFactory(timeout_s=30).build(store, "pg", 0, rank, 2, tp=1)
    pgs = install(s, store, rank, 2, 1, default=True)
    res: dict[str, Any] = {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "dp_rank": dist.get_rank(pgs["dp"]),
        "tp_size": dist.get_world_size(pgs["tp"]),
    }
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    res["allreduce"] = t.clone()
    m = torch.tensor([float(rank)])
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=pgs["dp"])
    res["max"] = m.clone()
    b = torch.full((2,), float(rank + 10))
    dist.broadcast(b, src=1)
    res["broadcast"] = b.clone()
    parts = [torch.zeros(2) for _ in range(2)]
    dist.all_gather(parts, torch.full((2,), float(rank)))
    res["all_gather"] = torch.stack(parts)
    work = dist.all_reduce(torch.ones(1), async_op=True)
    res["async_done"] = bool(work.wait())
    dist.barrier()
    res.update(_more_collectives(rank, pgs))
    # torch's own DDP on the recoverable dp group: gradients are the mean over ranks
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    ddp = DDP(model, process_group=pgs["dp"], init_sync=False)
    g = torch.Generator().manual_seed(100 + rank)
    ddp(torch.randn(5, 4, generator=g)).sum().backward()
    res["grads"] = [p.grad.clone() for p in model.parameters()]
    local = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    local.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(100 + rank)
    local(torch.randn(5, 4, generator=g)).sum().backward()
    res["local_grads"] = [p.grad.clone() for p in local.parameters()]
    res["kinds"] = sorted(set(s.kinds))
    res["broken"] = s.broken
    torch.save(res, out)
    dist.destroy_process_group()  # a user's script ends with it: must not fail


def _more_collectives(rank: int, pgs: dict[str, RecoverableGroup]) -> dict[str, Any]:
    """The rest of torch.distributed's collectives, functional collectives (by group object, by
    registered name, by a DeviceMesh dimension) and a DTensor redistribute."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x = torch.arange(4.0) + 10 * rank
    out: dict[str, Any] = {}
    t = torch.empty(8)
    dist.all_gather_into_tensor(t, x)
    out["all_gather_into_tensor"] = t
    t = torch.empty(2)
    dist.reduce_scatter_tensor(t, x)
    out["reduce_scatter_tensor"] = t
    t = torch.empty(4)
    dist.reduce_scatter(t, [x, 2 * x])
    out["reduce_scatter"] = t
    t = torch.empty(4)
    dist.all_to_all_single(t, x)
    out["all_to_all_single"] = t
    t = x.clone()
    dist.reduce(t, dst=0)
    out["reduce"] = t if rank == 0 else None
    parts = [torch.empty(4) for _ in range(2)] if rank == 0 else None
    dist.gather(x, parts, dst=0)
    out["gather"] = torch.stack(parts) if parts is not None else None
    t = torch.empty(4)
    dist.scatter(t, [x, 2 * x] if rank == 1 else None, src=1)
    out["scatter"] = t
    g = pgs["global"]
    out["fc_all_reduce"] = funcol.wait_tensor(funcol.all_reduce(x, "sum", g))
    out["fc_all_reduce_by_name"] = funcol.wait_tensor(funcol.all_reduce(x, "max", g.group_name))
    out["fc_all_gather"] = funcol.wait_tensor(funcol.all_gather_tensor(x, 0, g))
    out["fc_reduce_scatter"] = funcol.wait_tensor(funcol.reduce_scatter_tensor(x, "sum", 0, g))
    out["fc_all_reduce_coalesced"] = [funcol.wait_tensor(y) for y in funcol.all_reduce_coalesced([x, 3 * x], "sum", g)]
    out["fc_broadcast"] = funcol.wait_tensor(funcol.broadcast(x, 1, g))
    mesh = DeviceMesh.from_group(
        [pgs["dp"], pgs["tp"]], "cpu", mesh=torch.arange(2).view(2, 1), mesh_dim_names=("dp", "tp")
    )
    out["mesh_groups_are_ours"] = mesh.get_group("dp") is pgs["dp"] and mesh.get_group("tp") is pgs["tp"]
    out["fc_on_mesh_dim"] = funcol.wait_tensor(funcol.all_reduce(x, "sum", (mesh, 0)))
    dt = distribute_tensor(torch.arange(6.0), mesh["dp"], [Shard(0)])
    out["dtensor_local"] = dt.to_local().clone()
    out["dtensor_full"] = dt.redistribute(mesh["dp"], [Replicate()]).to_local()
    return out


@pytest.mark.timeout(90)
def test_user_collectives_and_torch_ddp_run_on_recoverable_groups(tmp_path: Any) -> None:
    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"r{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_worker, args=(master.port, r, outs[r]), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(80)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    r0, r1 = (torch.load(o, weights_only=False) for o in outs)
    for rank, r in enumerate((r0, r1)):
        assert (r["rank"], r["world"], r["dp_rank"], r["tp_size"]) == (rank, 2, rank, 1)
        assert torch.equal(r["allreduce"], torch.full((3,), 3.0))
        assert torch.equal(r["max"], torch.tensor([1.0]))
        assert torch.equal(r["broadcast"], torch.full((2,), 11.0))
        assert torch.equal(r["all_gather"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        assert r["async_done"] and r["broken"] is None
        assert r["kinds"] == ["dp", "global"]
        x0, x1 = torch.arange(4.0), torch.arange(4.0) + 10
        assert torch.equal(r["all_gather_into_tensor"], torch.cat([x0, x1]))
        assert torch.equal(r["reduce_scatter_tensor"], (x0 + x1)[2 * rank : 2 * rank + 2])
        assert torch.equal(r["reduce_scatter"], (x0 + x1) * (rank + 1))
        assert torch.equal(
            r["all_to_all_single"], torch.cat([x0[2 * rank : 2 * rank + 2], x1[2 * rank : 2 * rank + 2]])
        )
        assert torch.equal(r["scatter"], x1 * (rank + 1))
        assert torch.equal(r["fc_all_reduce"], x0 + x1)
        assert torch.equal(r["fc_all_reduce_by_name"], x1)
        assert torch.equal(r["fc_all_gather"], torch.cat([x0, x1]))
        assert torch.equal(r["fc_reduce_scatter"], (x0 + x1)[2 * rank : 2 * rank + 2])
        assert [y.tolist() for y in r["fc_all_reduce_coalesced"]] == [(x0 + x1).tolist(), (3 * (x0 + x1)).tolist()]
        assert torch.equal(r["fc_broadcast"], x1)
        assert r["mesh_groups_are_ours"]
        assert torch.equal(r["fc_on_mesh_dim"], x0 + x1)
        assert torch.equal(r["dtensor_local"], torch.arange(6.0)[3 * rank : 3 * rank + 3])
        assert torch.equal(r["dtensor_full"], torch.arange(6.0))
    assert torch.equal(r0["reduce"], torch.arange(4.0) * 2 + 10)
    assert torch.equal(r0["gather"], torch.stack([torch.arange(4.0), torch.arange(4.0) + 10]))
    for g0, g1, l0, l1 in zip(r0["grads"], r1["grads"], r0["local_grads"], r1["local_grads"]):
        assert torch.equal(g0, g1)
        assert torch.allclose(g0, (l0 + l1) / 2, atol=1e-6)
    assert not torch.equal(r0["local_grads"][0], r1["local_grads"][0])  # the ranks' own differed


def _pair(session: Session) -> tuple[RecoverableGroup, threading.Thread, dist.Store]:
    """Rank 0 here, rank 1 on a thread of this process: it joins the group, then never takes
    part in a collective (a peer that stopped)."""
    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    keep: list[Any] = []

    def peer() -> None:
        keep.append(GlooGroupFactory(timeout_s=30).build(_store(master.port), "pair", 0, 1, 2, tp=1))

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    session.groups = GlooGroupFactory(timeout_s=30).build(master, "pair", 0, 0, 2, tp=1)
    th.join(30)
    pg = RecoverableGroup(session, "global", 0, 2, 1)
    pg._keep = (keep, master)  # type: ignore[attr-defined]
    return pg, keep, master


@pytest.mark.timeout(60)
def test_a_pause_completes_a_collective_at_once_with_the_tensor_untouched() -> None:
    s = Session()
    pg, peer, _ = _pair(s)
    t = torch.full((4,), 2.0)
    threading.Timer(0.3, lambda: s.interruptor.interrupt("pause g1 from sidecar", generation=1)).start()
    t0 = time.monotonic()
    work = pg.allreduce([t])
    assert work.wait() is True  # no exception in user code
    waited = time.monotonic() - t0
    assert waited < 10  # the peer never comes: only the pause ended the wait
    assert torch.equal(t, torch.full((4,), 2.0))
    assert s.broken is not None and "interrupted" in s.broken and "pause g1" in s.broken
    abandoned = s.interruptor.take_abandoned()
    assert len(abandoned) == 1  # left running on the paused generation
    # later collectives of the lost step return at once and talk to nobody
    u = torch.ones(2)
    t1 = time.monotonic()
    assert pg.allreduce([u]).wait() and time.monotonic() - t1 < 1.0
    assert torch.equal(u, torch.ones(2))
    # The peer comes after all: the abandoned collective ends here, not in a gloo thread calling
    # back into an interpreter that is shutting down. Its late result lands in its own copy.
    peer[0].global_pg.allreduce([torch.zeros(4)]).wait()
    abandoned[0].wait()
    assert torch.equal(t, torch.full((4,), 2.0))


def test_group_members_follow_the_dp_tp_layout() -> None:
    assert members("global", 5, 8, 2) == list(range(8))
    assert members("dp", 5, 8, 2) == [1, 3, 5, 7]
    assert members("tp", 5, 8, 2) == [4, 5]
    with pytest.raises(ValueError):
        members("pp", 0, 8, 2)


@pytest.mark.timeout(60)
def test_a_pause_ends_a_functional_collectives_wait() -> None:
    import torch.distributed._functional_collectives as funcol
    from torch._C import _distributed_c10d as c10d_c

    s = Session()
    pg, peer, _ = _pair(s)
    c10d_c._unregister_process_group(pg.group_name)
    c10d_c._register_process_group(pg.group_name, pg)
    try:
        threading.Timer(0.3, lambda: s.interruptor.interrupt("pause g1 from sidecar", generation=1)).start()
        t0 = time.monotonic()
        out = funcol.wait_tensor(funcol.all_reduce(torch.full((4,), 2.0), "sum", pg))
        assert time.monotonic() - t0 < 10  # the peer never comes: only the pause ended the wait
        assert torch.equal(out, torch.full((4,), 2.0))  # nothing reduced into it
        assert s.broken is not None and "interrupted" in s.broken
        abandoned = s.interruptor.take_abandoned()
        peer[0].global_pg.allreduce([torch.zeros(4)]).wait()
        for a in abandoned:
            a.wait()
    finally:
        c10d_c._unregister_process_group(pg.group_name)
