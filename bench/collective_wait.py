"""What the agent's interruptible wait adds to one collective, against a plain ``work.wait()``.

Every collective of the reference job's step (tensor-parallel all-reduces, the gradient sync, the
commit vote) is waited on by ``Interruptor.wait`` so that a pause can end a wait whose peer is
stopped. N gloo ranks on this machine run rounds of small all-reduces, each round timing the
same number of collectives per way of waiting, interleaved:

- ``plain``: ``work.wait()`` (what a bare torch loop does; not interruptible);
- ``sliced``: ``Interruptor.wait`` (the work waited on in 20-ms slices, the interrupt looked at
  between them);
- ``callback``: the former wait, still used for works without a future: an Event set by a
  callback on the work's future (a Python callback on gloo's thread per collective).

    python -m flashrecovery.bench.collective_wait --ranks 2,8 --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

WAYS = ("plain", "sliced", "callback")


def _rank(rank: int, world: int, port: int, rounds: int, per_round: int, numel: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from flashrecovery.agent.groups import Interruptor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    intr = Interruptor()
    x = torch.ones(numel)
    wait = {
        "plain": lambda w: w.wait(),
        "sliced": lambda w: intr.wait(w, "allreduce", rank),
        "callback": lambda w: intr._wait_on_callback(w, "allreduce", rank),
    }
    for _ in range(100):  # warm-up: connections, allocator
        dist.all_reduce(x)
    us: dict[str, list[float]] = {w: [] for w in WAYS}
    for r in range(rounds):
        order = WAYS if r % 2 == 0 else WAYS[::-1]  # no way always runs first in a round
        for way in order:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(per_round):
                wait[way](dist.all_reduce(x, async_op=True))
            us[way].append((time.perf_counter() - t0) / per_round * 1e6)
    if rank == 0:
        out.put(us)
    dist.destroy_process_group()


def measure(world: int, rounds: int, per_round: int, numel: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from flashrecovery.shared.stack import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_rank, args=(world, free_port(), rounds, per_round, numel, q), nprocs=world)
    us = q.get(timeout=60)
    med = {w: statistics.median(us[w]) for w in WAYS}
    return {
        "ranks": world,
        "numel": numel,
        "rounds": rounds,
        "collectives_per_round": per_round,
        "us_per_collective_median": {w: round(v, 1) for w, v in med.items()},
        "us_per_collective_rounds": {w: [round(v, 1) for v in us[w]] for w in WAYS},
        "sliced_over_plain": round(med["sliced"] / med["plain"], 3),
        "callback_over_plain": round(med["callback"] / med["plain"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,8", help="world sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=500)
    p.add_argument("--numel", type=int, default=1, help="elements per all-reduce (1: the commit vote)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = [measure(int(n), args.rounds, args.per_round, args.numel) for n in args.ranks.split(",")]
    for r in rows:
        m = r["us_per_collective_median"]
        print(
            f"{r['ranks']} ranks: plain {m['plain']} us, sliced {m['sliced']} us ({r['sliced_over_plain']}x), "
            f"callback {m['callback']} us ({r['callback_over_plain']}x) per all-reduce of {r['numel']}"
        )
    if args.json:
        doc = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_before": os.getloadavg()[0],
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
