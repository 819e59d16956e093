"""The reference job (a dp x tp GPT, warmup + cosine LR, clipping, a grad-norm EMA buffer) on the
public API only: `fr.init`, torch's DDP on `agent.dp_group` (`agent.ddp`), tensor-parallel all-reduces as
ordinary `dist.all_reduce(..., group=agent.tp_group)`, `agent.register`, `agent.steps`.

    flashrecovery run --standalone --nproc-per-node 4 examples/reference_gpt/train.py --tp 2 --steps 30

agent/reference/train.py trains the same model on the agent's lower-level lifecycle
(begin_step / sync_gradients / commit / recover), which the benchmarks use; this is how a user
would write it. The model needs an object with ``tp_allreduce(t)`` for its tensor-parallel
layers: here, three lines over the recoverable tp group. Its dropout draws from its own
generators (``model.rng``), seeded per step from (seed, step, dp index, rank) so the replicated
activations get the same mask on every tp rank of a replica.
"""

import argparse
import os

import torch
import torch.distributed as dist

import flashrecovery.agent as fr
from flashrecovery.agent.reference.model import TPGPT, ModelConfig, batch
from flashrecovery.agent.reference.recipe import OPTIMIZERS, build_recipe


class TPComm:
    """The model's tensor-parallel all-reduce, on a recoverable process group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def tp_allreduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab=256, d_model=64, n_heads=4, n_layers=2, seq=32, dropout=0.1)

    agent = fr.init(tp=args.tp, seed=args.seed)
    rank = dist.get_rank()
    net = TPGPT(cfg, args.tp, dist.get_rank(agent.tp_group), TPComm(agent.tp_group), args.seed)
    model = agent.ddp(net)
    recipe = build_recipe(net, args)
    opt = recipe.optimizer
    agent.register(model, opt, scheduler=recipe.scheduler)

    for step in agent.steps(args.steps):
        net.rng.reseed(args.seed, step, agent.dp_index, rank)
        x, y = batch(args.seed, step, agent.dp_index, args.micro_batch, cfg)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        recipe.before_apply(step)  # clip, then the grad-norm EMA (a buffer)
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "stateful": {"scheduler": recipe.scheduler.state_dict()},
                "step": args.steps,
                "pid": os.getpid(),
            },
            os.path.join(args.out, f"rank{rank}.pt"),
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
