"""The baseline: the reference dp x tp GPT under plain `torchrun`, checkpointing to disk.

    torchrun --nproc-per-node 8 --max-restarts 3 -m flashrecovery.bench.baseline_train \
        --steps 40 --tp 2 --ckpt-every 10 --dir /tmp/base

Same model, data and update (agent/reference/recipe.py: optimizer, LR schedule, clipping) as
agent/reference/train.py, but with torch.distributed's
default group + gloo and no recovery agent: a failure kills the whole worker group, torchrun
restarts every worker, and each rank resumes from its newest checkpoint (rank{r}.ckpt.pt).

The store is namespaced per restart attempt (TORCHELASTIC_RESTART_COUNT): with plain env://
the restarted workers read the previous attempt's gloo addresses and die in connectFullMesh.

Progress goes to --dir/progress.log (rank 0: "<attempt> <step> <wall time>" per committed step)
and --dir/pids.log ("<attempt> <rank> <pid>" at start), which the harness reads.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from flashrecovery.agent.gradients import flatten_grads, unflatten_into_grads
from flashrecovery.agent.reference.model import TPGPT, ModelConfig, batch
from flashrecovery.agent.reference.recipe import build_recipe
from flashrecovery.agent.reference.train import add_job_args


class TPComm:
    """What the model needs from a communicator: an allreduce over its tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def tp_allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    add_job_args(p)
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every K steps (0: never)")
    p.add_argument("--dir", required=True, help="checkpoints, progress and final state")
    p.add_argument("--bare", action="store_true", help="no checkpoints, no progress files")
    return p.parse_args(argv)


def build_groups(world: int, tp: int, rank: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Megatron layout (rank = dp_index * tp + tp_index); every rank creates every group."""
    tp_pg = dp_pg = None
    if tp > 1:
        for start in range(0, world, tp):
            g = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                tp_pg = g
    if world // tp > 1:
        for i in range(tp):
            g = dist.new_group(list(range(i, world, tp)))
            if rank % tp == i:
                dp_pg = g
    return tp_pg, dp_pg


def init_distributed() -> tuple[int, int, int]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    limit = datetime.timedelta(seconds=120)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=limit)
    prefixed = dist.PrefixStore(f"baseline/attempt{attempt}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world, timeout=limit)
    return rank, world, attempt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world, attempt = init_distributed()
    tp_pg, dp_pg = build_groups(world, args.tp, rank)
    dp_size = world // args.tp
    dp_index = rank // args.tp
    cfg = ModelConfig(
        vocab=args.vocab,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        seq=args.seq,
        dropout=args.dropout,
    )
    model = TPGPT(cfg, args.tp, rank % args.tp, TPComm(tp_pg), args.seed)
    recipe = build_recipe(model, args)
    opt, sched = recipe.optimizer, recipe.scheduler
    os.makedirs(args.dir, exist_ok=True)
    ckpt = os.path.join(args.dir, f"rank{rank}.ckpt.pt")
    applied = 0
    if not args.bare:
        with open(os.path.join(args.dir, "pids.log"), "a") as f:
            f.write(f"{attempt} {rank} {os.getpid()}\n")
        if os.path.exists(ckpt):
            state = torch.load(ckpt, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            applied = state["step"]
    progress = open(os.path.join(args.dir, "progress.log"), "a") if rank == 0 and not args.bare else None
    params = list(model.parameters())
    step_times = []
    step = applied + 1
    while step <= args.steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        model.rng.reseed(args.seed, step, dp_index, rank)
        x, y = batch(args.seed, step, dp_index, args.micro_batch, cfg)
        model(x, y).backward()
        grads, flat = flatten_grads(params)
        if dp_pg is not None:
            dist.all_reduce(flat, group=dp_pg)
            flat.div_(dp_size)
        unflatten_into_grads(params, grads, flat)
        recipe.apply(step)  # clip + grad-norm EMA, optimizer.step(), scheduler.step()
        applied = step
        step_times.append(time.perf_counter() - t0)
        if args.ckpt_every and step % args.ckpt_every == 0 and not args.bare:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                },
                ckpt + ".tmp",
            )
            os.replace(ckpt + ".tmp", ckpt)
        if progress is not None:
            progress.write(f"{attempt} {step} {time.time():.6f}\n")
            progress.flush()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        step += 1
    dist.barrier()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "stateful": {k: v.state_dict() for k, v in recipe.stateful().items()},
            "step": applied,
            "pid": os.getpid(),
            "step_times": step_times,
        },
        os.path.join(args.dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
