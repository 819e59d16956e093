"""Reference training job: dp x tp GPT on synthetic tokens, with the recovery agent in the loop.

    FLASHRECOVERY_AGENT_RANK=0 FLASHRECOVERY_AGENT_WORLD_SIZE=2 FLASHRECOVERY_AGENT_RDZV=127.0.0.1:29500 \
        python -m flashrecovery.agent.reference.train --steps 30 --tp 2 --out /tmp/run

Identity and rendezvous come from FLASHRECOVERY_AGENT_* (shared/settings.py AgentSettings); the
job shape from flags.
Each rank writes ``rank{r}.pt`` (model, optimizer and stateful state_dicts, step, digest, pid)
to --out. The update (optimizer, warmup + cosine LR schedule, gradient clipping, a grad-norm EMA
buffer) is built by recipe.build_recipe and applied by the agent (attach's scheduler and
before_apply), once per applied step, recovery commits included.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..agent import RecoveryAgent
from ..transfer import state_digest
from .model import TPGPT, ModelConfig, batch
from .recipe import OPTIMIZERS, build_recipe


def add_job_args(p: argparse.ArgumentParser) -> None:
    """The job's shape (model, data, optimizer): shared with the torchrun baseline so both train
    the very same job."""
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw (weight decay 0.01) or sgd (momentum 0.9)"
    )
    p.add_argument("--warmup-steps", type=int, default=5, help="linear LR warmup, then cosine decay to 10%% at --steps")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm per tp shard (0: no clipping)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    add_job_args(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="directory for rank{r}.pt final state dumps")
    p.add_argument(
        "--progress", default=None, help="rank 0 appends '0 <step> <wall time>' per committed step (benchmarks)"
    )
    # Fault-free irregularities that a detector must not mistake for a hang.
    p.add_argument(
        "--slow-step",
        type=_slow_step,
        default=None,
        metavar="STEP:SECONDS:RANK",
        help="rank RANK spends SECONDS more inside step STEP (its peers wait for it in the gradient allreduce)",
    )
    p.add_argument(
        "--long-phase",
        type=_long_phase,
        default=None,
        metavar="STEP:SECONDS",
        help="after step STEP every rank declares an 'eval' phase and spends SECONDS in it",
    )
    return p.parse_args(argv)


def _slow_step(v: str) -> tuple[int, float, int]:
    step, seconds, rank = v.split(":")
    return int(step), float(seconds), int(rank)


def _long_phase(v: str) -> tuple[int, float]:
    step, seconds = v.split(":")
    return int(step), float(seconds)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        # bitwise reproducibility on the GPU (embedding backward accumulates with atomics else)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    cfg = ModelConfig(
        vocab=args.vocab,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        seq=args.seq,
        dropout=args.dropout,
    )

    agent = RecoveryAgent.from_env(tp=args.tp)
    # A standby does not know its rank yet: shapes do not depend on it, values are replaced by
    # the state transfer, and nothing in the model caches the rank.
    tp_index = (agent.rank or 0) % args.tp
    model = TPGPT(cfg, args.tp, tp_index, agent.comm, args.seed).to(args.device)
    recipe = build_recipe(model, args)
    opt = recipe.optimizer
    agent.attach(model, opt, scheduler=recipe.scheduler, before_apply=recipe.before_apply)

    def loss_at(step: int) -> torch.Tensor:
        g = agent.groups
        model.rng.reseed(args.seed, step, g.dp_index, g.rank)
        x, y = batch(args.seed, step, g.dp_index, args.micro_batch, cfg, args.device)
        return model(x, y)

    # ---- the agent in the loop -------------------------------------------------------------
    step = agent.start()
    progress = open(args.progress, "a") if args.progress and agent.rank == 0 else None
    while step <= args.steps:
        try:
            agent.begin_step(step)
            with agent.compute():  # a pause ends the step's compute at once (agent/compute.py)
                loss_at(step).backward()
                slow = args.slow_step
                # generation 0 only: a step redone after a recovery is not slow again
                if slow and slow[0] == step and slow[2] == agent.rank and agent.generation == 0:
                    print(f"slow step {step}: {slow[1]} s extra on rank {agent.rank}", flush=True)
                    time.sleep(slow[1])
                if args.step_sleep:
                    time.sleep(args.step_sleep)  # the stand-in for a bigger model's compute
            agent.sync_gradients()
            step = agent.commit()
            if progress is not None:
                progress.write(f"0 {step - 1} {time.time():.6f}\n")
                progress.flush()
        except Exception as exc:  # noqa: BLE001 - recover() decides: a peer's fault or re-raise
            step = agent.recover(exc)
        if args.long_phase and args.long_phase[0] == step - 1:
            # declared with headroom, as a user would for an evaluation of known length
            agent.long_phase("eval", expected_s=1.5 * args.long_phase[1])
            time.sleep(args.long_phase[1])
            print(f"long phase eval after step {step - 1}: {args.long_phase[1]} s", flush=True)
    # -----------------------------------------------------------------------------------------

    stateful = recipe.stateful()
    digest = state_digest(model, opt, stateful, agent.applied_step)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"rank{agent.rank}.pt")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "stateful": {k: v.state_dict() for k, v in stateful.items()},
                "step": agent.applied_step,
                "digest": digest,
                "pid": os.getpid(),
                "recoveries": agent.recoveries,
            },
            path + ".tmp",
        )
        os.replace(path + ".tmp", path)
    agent.finish(digest)


if __name__ == "__main__":
    main()
