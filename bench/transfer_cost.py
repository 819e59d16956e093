"""What a replica-to-replacement state transfer costs: one tensor waited for at a time (the
transfer until stop 31) against tensors posted in windows and waited for together, interleaved
in one run, on the reference job's training state (its default model, tp 2 shard, AdamW after
one step: parameters, two moments per parameter, the step counts, the scheduler).

    python -m flashrecovery.bench.transfer_cost --reps 15 [--layers 4] [--out F]

Two processes on loopback gloo (the global group the agent builds), the receiver timing
``recv_state`` from its first byte asked to its digest checked; each rep moves the state once
per variant, the order alternating by rep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flashrecovery.agent.groups import Comm, GlooGroupFactory, Interruptor
from flashrecovery.agent.reference.model import TPGPT, ModelConfig
from flashrecovery.agent.reference.recipe import build_recipe
from flashrecovery.agent.reference.train import parse_args
from flashrecovery.agent.transfer import WINDOW_BYTES, TrainingState, encode, recv_state, send_state

VARIANTS = {"one at a time": 0, "windowed": WINDOW_BYTES}


def _state(job_args: list[str]) -> TrainingState:
    args = parse_args(job_args)
    cfg = ModelConfig(
        vocab=args.vocab, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, seq=args.seq, dropout=0.0
    )
    comm = Comm(Interruptor())  # tp collectives are not used: only shapes and values matter here
    model = TPGPT(cfg, args.tp, 0, comm, args.seed)
    recipe = build_recipe(model, args)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    recipe.optimizer.step()  # the optimizer's state exists, as on a rank that trained
    recipe.scheduler.step()
    return TrainingState(model, recipe.optimizer, recipe.stateful())


def _comm(port: int, rank: int) -> Comm:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    comm = Comm(Interruptor())
    comm.groups = GlooGroupFactory(timeout_s=60).build(store, "transfer-bench", 0, rank, 2, tp=1)
    comm._store = store  # type: ignore[attr-defined]  # alive with the groups
    return comm


def _order(rep: int) -> list[str]:
    names = list(VARIANTS)
    return names if rep % 2 == 0 else names[::-1]


def _sender(port: int, reps: int, job_args: list[str]) -> None:
    torch.set_num_threads(1)
    state = _state(job_args)
    comm = _comm(port, 0)
    for rep in range(reps + 1):  # rep 0 warms the pairs up, not timed
        for name in _order(rep):
            send_state(comm, 1, state, 1, window_bytes=VARIANTS[name])


def run(reps: int, job_args: list[str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    proc = mp.get_context("spawn").Process(target=_sender, args=(store.port, reps, job_args), daemon=True)
    proc.start()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        comm = _comm(store.port, 1)
        state = _state(job_args + ["--seed", "1"])  # other values: all of it must arrive
        meta, tensors = encode(state.tree(), 1)
        for rep in range(reps + 1):
            for name in _order(rep):
                t0 = time.perf_counter()
                res = recv_state(comm, 0, state, window_bytes=VARIANTS[name])
                if not res.digest_ok:
                    raise RuntimeError(f"{name}: digest mismatch")
                if rep:
                    times[name].append(time.perf_counter() - t0)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    return {
        "tensors": len(tensors),
        "bytes": res.bytes,
        "reps": reps,
        "ms": {
            name: {
                "median": round(1e3 * statistics.median(v), 2),
                "min": round(1e3 * min(v), 2),
                "max": round(1e3 * max(v), 2),
            }
            for name, v in times.items()
        },
        "ratio_one_at_a_time_over_windowed": round(
            statistics.median(times["one at a time"]) / statistics.median(times["windowed"]), 2
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--layers", type=int, default=None, help="the reference model's layers (default: the job's)")
    p.add_argument("--tp", type=int, default=2, help="the shard's tp degree (the demo job's is 2)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    job_args = ["--tp", str(args.tp)] + (["--layers", str(args.layers)] if args.layers else [])
    result = {
        "command": "python -m flashrecovery.bench.transfer_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "job_args": job_args,
        **run(args.reps, job_args),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
