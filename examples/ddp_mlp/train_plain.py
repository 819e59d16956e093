"""A small DDP MLP as a torchrun user writes it (train.py beside it: the same, recoverable).

torchrun --standalone --nproc-per-node 4 train_plain.py --steps 40 --out /tmp/mlp
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler


def make_dataset(n: int, d_in: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ w).tanh() + 0.1 * torch.randn(n, 1, generator=g))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    dataset = make_dataset(65536, 32, args.seed)
    sampler = DistributedSampler(dataset, seed=args.seed, drop_last=True)
    batches = iter(DataLoader(dataset, args.batch_size, sampler=sampler, drop_last=True))

    for step in range(1, args.steps + 1):
        x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        time.sleep(args.step_sleep)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": args.steps,
                "pid": os.getpid(),
            },
            os.path.join(args.out, f"rank{rank}.pt"),
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
