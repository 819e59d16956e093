"""A small DDP MLP, written as a torchrun user would, made recoverable with FlashRecovery.

    flashrecovery run --standalone --nproc-per-node 4 examples/ddp_mlp/train.py --steps 40 --out /tmp/mlp

Compared with train_plain.py beside it (`diff train_plain.py train.py`), the changes are: the
import, `fr.init()` in place of `init_process_group`, DDP on the agent's data-parallel group,
`agent.register(...)`, `agent.steps(...)` in place of `range(...)`, batches by step, the
shutdown. Each rank saves its final model, optimizer and scheduler state to --out/rank{r}.pt.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import flashrecovery.agent as fr


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

    agent = fr.init(seed=args.seed)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(),
                              torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    model = DDP(net, process_group=agent.dp_group, init_sync=False)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
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
            import time
            time.sleep(args.step_sleep)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "pid": os.getpid()},
                   os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
