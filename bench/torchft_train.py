"""The TorchFT baseline: the reference dp x tp GPT with data parallelism through torchft's Manager.

One replica group = one `torchrun` (its own store, `--max-restarts`), tp ranks inside it:

    TORCHFT_LIGHTHOUSE=http://localhost:29510 torchrun --standalone --nproc-per-node 2 \
        --max-restarts 3 -m flashrecovery.bench.torchft_train --replica-id 1 --steps 30 --tp 2 --dir /tmp/tft

Job shape: the same as the reference job and the torchrun baseline (dp = number of replica
groups, tp = `--tp` ranks inside each group), the same `TPGPT`, data, dropout seeding and update
(agent/reference/recipe.py: optimizer, LR schedule, clipping).
Rank r of the reference job is local rank r % tp of replica group r // tp (rank 2 = replica 1,
local rank 0). The tp all-reduces run on a plain gloo group inside the replica; the gradient
all-reduce across replicas runs through `Manager.allreduce` on a torchft `ProcessGroupGloo`
(one per local rank: local rank i of every replica group), and the optimizer only steps when
`Manager.should_commit()` agrees. A dead rank fails its whole replica group (torchrun restarts
both ranks); the restarted group heals from a live replica (torchft's checkpoint transport) while
the other groups keep training at reduced width (min_replica_size 1).

Differences from the reference job, by torchft's design: while a replica group is down its
micro-batches are not trained (the step commits with fewer participants and the average is over
the participants), and the healing group contributes zero gradients on its first step.

The data of a step depends on (seed, step, replica id) as in the reference job (dp index =
replica id); the step is torchft's committed step count + 1.

Files under --dir (read by bench/torchft_bench.py):
  progress-r{R}.log  local rank 0: "<attempt> <step> <wall time> <participants> <committed 0|1>"
                     per should_commit
  pids.log           "<replica> <attempt> <local rank> <pid>" at start
  ready-r{R}         local rank 0, once its Manager exists (the harness waits for every replica
                     before writing `go`, so the first quorum has all of them)
  stalled            with --stall-at (fault injection inside the gradient all-reduce)
  final-r{R}-{i}.txt "<step> <state digest>" at the end
  not-healed-r{R}-{i}  a restarted group came back after the others had finished (it stops
                     after one step instead of training alone from step 1)
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
from flashrecovery.agent.transfer import state_digest

from .baseline_train import TPComm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    add_job_args(p)
    p.add_argument("--replica-id", type=int, required=True, help="replica group = dp index")
    p.add_argument(
        "--lighthouse",
        default=os.environ.get("TORCHFT_LIGHTHOUSE"),
        help="lighthouse address (default $TORCHFT_LIGHTHOUSE)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="torchft collective / commit timeout, s")
    p.add_argument("--quorum-timeout", type=float, default=120.0, help="torchft quorum timeout, s")
    p.add_argument("--go-timeout", type=float, default=300.0, help="max wait for the harness's go file, s")
    p.add_argument(
        "--stall-at",
        type=int,
        default=0,
        help="fault injection: on attempt 0, local rank --stall-rank of this replica stops "
        "right before the gradient all-reduce of this step (writes --dir/stalled and "
        "sleeps), so the peers are inside the all-reduce when the harness kills it",
    )
    p.add_argument("--stall-rank", type=int, default=0)
    p.add_argument("--dir", required=True)
    return p.parse_args(argv)


def _replica_store(attempt: int, local_rank: int, timeout: datetime.timedelta) -> tuple[dist.TCPStore, int]:
    """The replica group's store for the Manager: a fresh TCPStore per torchrun attempt, hosted by
    local rank 0 and announced through torchrun's store. (The Manager keeps its server address
    under fixed keys: on torchrun's own store a restarted rank 1 would read the dead one's.)"""
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    key = f"torchft_bench/attempt{attempt}/store_port"
    if local_rank == 0:
        own = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False, timeout=timeout)
        base.set(key, str(own.port))
        return own, own.port
    return base, int(base.get(key))  # get() waits for the key (store timeout)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchft import Manager, ProcessGroupGloo  # benchmark-only dependency

    local_rank, tp = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    assert tp == args.tp, f"--nproc-per-node ({tp}) must equal --tp ({args.tp})"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = datetime.timedelta(seconds=args.timeout)
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "pids.log"), "a") as f:
        f.write(f"{args.replica_id} {attempt} {local_rank} {os.getpid()}\n")

    store_keep, store_port = _replica_store(attempt, local_rank, datetime.timedelta(seconds=120))
    tp_group = None
    if tp > 1:
        limit = datetime.timedelta(seconds=120)
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        base = dist.TCPStore(addr, port, is_master=False, timeout=limit)
        prefixed = dist.PrefixStore(f"torchft_bench/tp/attempt{attempt}", base)
        dist.init_process_group("gloo", store=prefixed, rank=local_rank, world_size=tp, timeout=limit)
        tp_group = dist.group.WORLD

    cfg = ModelConfig(
        vocab=args.vocab,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        seq=args.seq,
        dropout=args.dropout,
    )
    model = TPGPT(cfg, tp, local_rank, TPComm(tp_group), args.seed)
    recipe = build_recipe(model, args)
    opt, sched = recipe.optimizer, recipe.scheduler

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=lambda sd: (
            model.load_state_dict(sd["model"]),
            opt.load_state_dict(sd["optim"]),
            sched.load_state_dict(sd["scheduler"]),
        ),
        state_dict=lambda: {"model": model.state_dict(), "optim": opt.state_dict(), "scheduler": sched.state_dict()},
        min_replica_size=1,
        timeout=timeout,
        quorum_timeout=datetime.timedelta(seconds=args.quorum_timeout),
        connect_timeout=datetime.timedelta(seconds=60),
        rank=local_rank,
        world_size=tp,
        store_addr="localhost",
        store_port=store_port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica_{args.replica_id}",
        init_sync=False,  # every replica builds the same weights from the seed
    )
    if local_rank == 0:
        open(os.path.join(args.dir, f"ready-r{args.replica_id}"), "w").close()
    # The first quorum should hold every replica: wait for the harness's go (it exists already
    # when a restarted group comes back).
    deadline = time.monotonic() + args.go_timeout
    while not os.path.exists(os.path.join(args.dir, "go")):
        if time.monotonic() > deadline:
            raise TimeoutError("no go file from the harness")
        time.sleep(0.05)

    progress = open(os.path.join(args.dir, f"progress-r{args.replica_id}.log"), "a") if local_rank == 0 else None
    params = list(model.parameters())
    orphaned = False
    while manager.current_step() < args.steps:
        step = manager.current_step() + 1
        manager.start_quorum()
        opt.zero_grad(set_to_none=False)
        model.rng.reseed(args.seed, step, args.replica_id, args.replica_id * tp + local_rank)
        x, y = batch(args.seed, step, args.replica_id, args.micro_batch, cfg)
        model(x, y).backward()
        grads, flat = flatten_grads(params)
        if args.stall_at == step and attempt == 0 and local_rank == args.stall_rank:
            open(os.path.join(args.dir, "stalled"), "w").close()
            time.sleep(3600)  # the harness SIGKILLs us here
        manager.allreduce(flat).wait()  # average over the participants; errors are reported to the manager
        unflatten_into_grads(params, grads, flat)
        committed = manager.should_commit()
        if committed:
            recipe.apply(step)
        if progress is not None:
            # the participants of the step just done (the quorum is settled by now)
            progress.write(
                f"{attempt} {manager.current_step() if committed else step} {time.time():.6f} "
                f"{manager.num_participants()} {int(committed)}\n"
            )
            progress.flush()
        if attempt > 0 and committed and manager.current_step() == 1:
            # A restarted group whose first commit is step 1 had no live peer to heal from: the
            # others finished the job while it was down. Training alone from scratch would be
            # another job; record it and stop.
            with open(os.path.join(args.dir, f"not-healed-r{args.replica_id}-{local_rank}"), "w") as f:
                f.write(f"{time.time():.6f}\n")
            orphaned = True
            break
        if args.step_sleep:
            time.sleep(args.step_sleep)

    if not orphaned:
        with open(os.path.join(args.dir, f"final-r{args.replica_id}-{local_rank}.txt"), "w") as f:
            digest = state_digest(model, opt, recipe.stateful(), manager.current_step())
            f.write(f"{manager.current_step()} {digest}\n")
    if progress is not None:
        progress.close()
    manager.shutdown(wait=False)
    del store_keep
    # torchft's server threads and the gloo groups can hold the interpreter at exit; the work
    # is on disk, so leave now.
    os._exit(0)


if __name__ == "__main__":
    main()
