"""Where the agent's per-step cost goes, on the DDP example's model (2 ranks, gloo, no sidecar):
four variants, each adding one piece, interleaved, steady-state ms/step from rank 0.

    python -m flashrecovery.bench.agent_cost_breakdown --runs 3

plain     torch's DDP on init_process_group("gloo")
group     torch's DDP on the agent's recoverable dp group (copies + Python dispatch per collective)
group_fu  + find_unused_parameters=True (what recovery needs: a fixed bucket layout)
agent     + agent.register/steps: commit vote, per-step reseed, buffer snapshot
Not part of CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch.distributed as dist

VARIANTS = ("plain", "group", "group_fu", "agent")
WORKER = r"""
import os, time, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import flashrecovery.agent as fr
V, STEPS, WARM = os.environ["V"], int(os.environ["STEPS"]), 50
torch.set_num_threads(1)
if V == "plain":
    dist.init_process_group("gloo"); pg = None
else:
    agent = fr.init(seed=0); pg = agent.dp_group
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(),
                          torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
model = DDP(net) if pg is None else DDP(net, process_group=pg, init_sync=False,
                                        find_unused_parameters=V in ("group_fu", "agent"))
opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
if V == "agent":
    agent.register(model, opt)
steps = agent.steps(STEPS) if V == "agent" else range(1, STEPS + 1)
x, y = torch.randn(16, 32), torch.randn(16, 1)
for step in steps:
    if step == WARM:
        t0 = time.perf_counter()
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
if dist.get_rank() == 0:
    print("MS_PER_STEP", (time.perf_counter() - t0) / (STEPS - WARM) * 1e3, flush=True)
"""


def one(variant: str, steps: int, nproc: int = 2) -> float | None:
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60)
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHRECOVERY_")}
    procs = []
    for r in range(nproc):
        env = {
            **base,
            "V": variant,
            "STEPS": str(steps),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        )
    out = ""
    try:
        for i, p in enumerate(procs):
            o, _ = p.communicate(timeout=300)
            if i == 0:
                out = o
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for line in out.splitlines():
        if line.startswith("MS_PER_STEP"):
            return float(line.split()[1])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.runs):
        for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            ms = one(v, args.steps)
            if ms is not None:
                rows[v].append(round(ms, 3))
            print(v, ms, flush=True)
    summary = {
        v: {"n": len(ms), "median_ms": statistics.median(ms) if ms else None, "all": ms} for v, ms in rows.items()
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"steps": args.steps, "runs": args.runs, "loadavg_end": list(os.getloadavg()), "summary": summary},
                f,
                indent=2,
            )
            f.write("\n")
    return 0 if all(s["n"] == args.runs for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
