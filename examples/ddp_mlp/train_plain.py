"""A plain torchrun DDP script: no FlashRecovery import, nothing launcher-specific.

    torchrun --standalone --nproc-per-node 2 train_plain.py --steps 30 --out /tmp/ddp
    flashrecovery run --standalone --nproc-per-node 2 --standbys 0 train_plain.py --steps 30 --out /tmp/ddp

A small MLP regression on synthetic data drawn from a fixed seed; each step every rank takes its
own slice of the batch; gloo on CPU; each rank saves its final model and optimizer state to
OUT/rank<R>.pt. Both launchers give bitwise-equal files (tests/e2e/test_launcher.py).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True, help="directory for rank<R>.pt")
    ap.add_argument("--batch", type=int, default=16, help="samples per rank per step")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    ddp = DDP(model)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.batch * world * args.steps
    x = torch.randn(n, 32, generator=g)
    y = x @ torch.randn(32, 8, generator=g) + 0.1 * torch.randn(n, 8, generator=g)

    for step in range(args.steps):
        lo = (step * world + rank) * args.batch  # this rank's slice of the step's global batch
        loss = nn.functional.mse_loss(ddp(x[lo:lo + args.batch]), y[lo:lo + args.batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.5f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": args.steps},
               os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
