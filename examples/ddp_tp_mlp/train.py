"""Data parallel x tensor parallel with ordinary torch.distributed calls, recoverable.

    flashrecovery run --standalone --nproc-per-node 4 examples/ddp_tp_mlp/train.py --tp 2 --steps 40

Ranks r with the same r // tp hold one replica; its MLP is split Megatron-style over the tp
ranks: the first layer by output columns, the second by input rows, and the partial outputs are
summed with a plain ``dist.all_reduce(..., group=agent.tp_group)``. Gradients are averaged over
the replicas by torch's own DDP on ``agent.dp_group``. With ``--mesh`` the same sum goes through
functional collectives over the "tp" dimension of the agent's ``DeviceMesh`` instead. Dropout
acts on the sharded hidden units (each unit lives on one tp rank), so the agent's per-rank
reseed is exactly what it needs; a layer that needs the same mask on every tp rank would seed
its own generator from (seed, step, dp index). Each rank saves its final state to
--out/rank{r}.pt.
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import flashrecovery.agent as fr


class _SumOverTP(torch.autograd.Function):
    """Forward: sum the tp ranks' partial outputs; backward: each rank's gradient as it is."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        if isinstance(group, tuple):  # (DeviceMesh, dim): functional collectives
            return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


class TPMLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, tp: int, tp_index: int, group: object, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # the full layers, then this rank's shard
        w1 = torch.randn(hidden, d_in, generator=g) / math.sqrt(d_in)
        w2 = torch.randn(d_out, hidden, generator=g) / math.sqrt(hidden)
        cols = slice(tp_index * hidden // tp, (tp_index + 1) * hidden // tp)
        self.w1 = torch.nn.Parameter(w1[cols].clone())
        self.b1 = torch.nn.Parameter(torch.zeros(hidden // tp))
        self.w2 = torch.nn.Parameter(w2[:, cols].clone())
        self.b2 = torch.nn.Parameter(torch.zeros(d_out))
        self.drop = torch.nn.Dropout(0.1)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.nn.functional.gelu(x @ self.w1.T + self.b1))
        return _SumOverTP.apply(h @ self.w2.T, self.group) + self.b2


def make_dataset(n: int, d_in: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d_in, generator=g)
    return torch.utils.data.TensorDataset(x, torch.sin(x[:, :4]).sum(1, keepdim=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--out", default=None)
    p.add_argument("--mesh", action="store_true", help="tp sum by functional collectives on a DeviceMesh")
    args = p.parse_args()
    torch.set_num_threads(1)

    agent = fr.init(tp=args.tp, seed=args.seed)
    rank = dist.get_rank()
    tp_index = dist.get_rank(agent.tp_group)

    tp_group = (agent.device_mesh(), 1) if args.mesh else agent.tp_group
    net = TPMLP(32, 128, 1, args.tp, tp_index, tp_group, args.seed)
    model = agent.ddp(net)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup, total = args.warmup, args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda n: min(1.0, (n + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, n / total))))
    )
    agent.register(model, opt, scheduler=sched)
    batches = agent.batches(make_dataset(4096, 32, args.seed), args.batch_size)

    for step in agent.steps(args.steps):
        x, y = batches(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "pid": os.getpid(),
            },
            os.path.join(args.out, f"rank{rank}.pt"),
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
