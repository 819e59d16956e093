"""Goodput at cluster scale, modelled from what was measured here and a published failure rate
(issue #14 item 5).

    .venv/bin/python -m flashrecovery.bench.goodput_model [--step-s 1.0] [--out FILE]

Each fault costs a system `detect + recover + lost work` seconds of the whole job; the job keeps
training at `1 / overhead` of the bare speed between faults and, with checkpoints, blocks
`save_s` every `ckpt_every` steps. With faults arriving at rate F per second of training, every
second of training brings F x cost seconds of downtime, so

    goodput = (1 / overhead) x (1 - checkpoint share) / (1 + F x mean cost per fault)

(a renewal model: it ignores a second fault inside a recovery, which at these rates is rare;
goodput is useful work over wall time, 1.0 being the bare loop with no fault and no checkpoint).

Where each input comes from is in INPUTS (the JSON keeps it beside every figure):
- the failure rate: Llama 3 (419 unexpected interruptions in 54 days on 16,384 GPUs, ~78%
  attributed to hardware), taken as a rate per GPU-hour, so the job's rate grows with its size;
- FlashRecovery: detection and recovery medians of the recovery suite and of the 4 Hz node-loss
  run (docs/results/), plus the growth of the control plane's recovery time with the number of
  ranks from the scale suite (simulated sidecars, 64 to 100k ranks), fault-free overhead 1.01x;
- torchrun + checkpoints: its agent's monitor interval (0.1 s, torch's default) for a process
  that exits, torch's default NCCL timeout (10 min) for a hardware fault that hangs a collective
  instead, the restart measured here on the 8-rank job (14.3 s median), which is a floor: at
  scale a restart also relaunches every process, re-initialises NCCL and reads the checkpoint;
  on average half a checkpoint interval recomputed, and a blocking save per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Llama 3 (Meta, 2024): 419 unexpected interruptions in 54 days of pre-training on 16,384 GPUs;
# about 78% of them attributed to confirmed or suspected hardware issues.
LLAMA3_INTERRUPTIONS = 419
LLAMA3_DAYS = 54
LLAMA3_GPUS = 16_384
LLAMA3_HARDWARE_SHARE = 0.78


@dataclass(frozen=True)
class FailureRate:
    per_gpu_hour: float
    hardware_share: float
    source: str

    def per_second(self, gpus: int) -> float:
        return self.per_gpu_hour * gpus / 3600.0


LLAMA3 = FailureRate(
    LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * 24 * LLAMA3_GPUS),
    LLAMA3_HARDWARE_SHARE,
    "Llama 3: 419 unexpected interruptions in 54 days on 16,384 GPUs, ~78% hardware",
)


@dataclass(frozen=True)
class System:
    name: str
    detect_s: dict[str, float]  # per fault class: "software", "hardware"
    recover_s: dict[str, float]  # after detection, on the measured job
    growth_s: Callable[[int], float]  # extra recovery time at this many GPUs (ranks)
    lost_steps: float  # steps of work thrown away per fault besides checkpoint rollback
    overhead: float = 1.0  # fault-free step time over the bare loop's
    ckpt_every: int | None = None  # steps between checkpoints (None: recovery needs none)
    ckpt_save_s: float = 0.0  # training blocked per checkpoint
    sources: dict[str, str] = field(default_factory=dict)


def fault_cost_s(system: System, fault_class: str, gpus: int, step_s: float) -> float:
    """Seconds of the whole job lost to one fault of this class."""
    rollback = system.ckpt_every * step_s / 2 if system.ckpt_every else 0.0
    return (
        system.detect_s[fault_class]
        + system.recover_s[fault_class]
        + system.growth_s(gpus)
        + system.lost_steps * step_s
        + rollback
    )


def goodput(system: System, rate: FailureRate, gpus: int, step_s: float) -> float:
    hw = rate.hardware_share
    cost = hw * fault_cost_s(system, "hardware", gpus, step_s) + (1 - hw) * fault_cost_s(
        system, "software", gpus, step_s
    )
    ckpt_share = 0.0
    if system.ckpt_every:
        period = system.ckpt_every * step_s * system.overhead
        ckpt_share = system.ckpt_save_s / (period + system.ckpt_save_s)
    return (1.0 / system.overhead) * (1.0 - ckpt_share) / (1.0 + rate.per_second(gpus) * cost)


def log_interpolate(points: Sequence[tuple[int, float]]) -> Callable[[int], float]:
    """y at x by linear interpolation in log10(x) between measured points; flat beyond them."""
    pts = sorted(points)

    def at(x: int) -> float:
        if x <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x <= x1:
                f = (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
                return y0 + f * (y1 - y0)
        return pts[-1][1]

    return at


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def measured_inputs(results: Path) -> dict:
    """The figures the model takes from docs/results/, each with the file it came from."""
    rec = json.loads((results / "bench_2core_recovery_baseline_n5.json").read_text())
    faults = rec["recovery"]["faults"]

    def med(fault: str, key: str) -> float:
        return _median([r[key] for r in faults[fault]["runs"] if r.get(key) is not None])

    node4 = json.loads((results / "node_loss_4hz_2core.json").read_text())["summary"]["4hz"]
    scale = json.loads((results / "scale_inband_n3_2core.json").read_text())["scale"]["points"]
    torchrun = [r for r in rec["baseline"]["runs"] if r["ckpt_every"] == 10]
    return {
        "ours_software_detect_s": med("process-crash", "detection_latency_s"),
        "ours_software_recover_s": med("process-crash", "rto_s") - med("process-crash", "detection_latency_s"),
        "ours_hang_detect_s": med("hang", "detection_latency_s"),
        "ours_hang_recover_s": med("hang", "rto_s") - med("hang", "detection_latency_s"),
        "ours_node_loss_4hz_detect_s": node4["detection_median_s"],
        "ours_node_loss_4hz_recover_s": node4["rto_median_s"] - node4["detection_median_s"],
        "ours_scale_after_detection_s": [(p["ranks"], p["recovery_after_detection_s"]) for p in scale],
        "torchrun_restart_s": _median([r["rto_s"] for r in torchrun]),
        "sources": {
            "recovery suite (8 ranks, n=5 per class)": "docs/results/bench_2core_recovery_baseline_n5.json",
            "node loss at 4 Hz heartbeats": "docs/results/node_loss_4hz_2core.json",
            "scale suite (simulated sidecars, n=3)": "docs/results/scale_inband_n3_2core.json",
        },
    }


def systems(m: dict, ckpt_every: int, ckpt_save_s: float, nccl_timeout_s: float) -> list[System]:
    scale = log_interpolate(m["ours_scale_after_detection_s"])
    base = scale(m["ours_scale_after_detection_s"][0][0])
    # Hardware, conservatively: a GPU fault that hangs a collective is caught by the hang check
    # (slower than a lost node's missed heartbeats), so the model takes the slower of the two.
    hw_detect = max(m["ours_hang_detect_s"], m["ours_node_loss_4hz_detect_s"])
    hw_recover = max(m["ours_hang_recover_s"], m["ours_node_loss_4hz_recover_s"])
    ours = System(
        "FlashRecovery",
        detect_s={"software": m["ours_software_detect_s"], "hardware": hw_detect},
        recover_s={"software": m["ours_software_recover_s"], "hardware": hw_recover},
        growth_s=lambda n: max(0.0, scale(n) - base),
        lost_steps=1.0,  # the step in flight, at most
        overhead=1.01,
        sources={
            "detect/recover": "medians measured on the 8-rank reference job (recovery suite, 4 Hz node loss)",
            "growth with ranks": "scale suite: recovery after detection, 64 -> 100k simulated ranks",
            "overhead": "overhead suite: 1.01x the bare loop (docs/benchmarks.md section 5)",
        },
    )
    torchrun = System(
        f"torchrun + checkpoint every {ckpt_every}",
        detect_s={"software": 0.1, "hardware": nccl_timeout_s},
        recover_s={"software": m["torchrun_restart_s"], "hardware": m["torchrun_restart_s"]},
        growth_s=lambda n: 0.0,  # not measured: a floor (see the module docstring)
        lost_steps=1.0,
        overhead=1.0,
        ckpt_every=ckpt_every,
        ckpt_save_s=ckpt_save_s,
        sources={
            "software detection": "torchrun --monitor-interval default 0.1 s",
            "hardware detection": f"collective timeout {nccl_timeout_s:g} s (torch's NCCL default: 10 min)",
            "restart": "measured on the 8-rank job, median of 3 (a floor at scale)",
            "checkpoint": f"every {ckpt_every} steps, {ckpt_save_s:g} s blocking save (assumed)",
        },
    )
    return [ours, torchrun]


def table(systems_: list[System], rate: FailureRate, gpus: Sequence[int], step_s: float) -> list[dict]:
    rows = []
    for n in gpus:
        row: dict = {"gpus": n, "faults_per_day": round(rate.per_second(n) * 86400, 2)}
        for s in systems_:
            row[s.name] = {
                "goodput": round(goodput(s, rate, n, step_s), 4),
                "cost_per_fault_s": {c: round(fault_cost_s(s, c, n, step_s), 2) for c in ("software", "hardware")},
            }
        rows.append(row)
    return rows


def headline(rows: list[dict], names: list[str], at: int) -> str:
    row = next(r for r in rows if r["gpus"] == at)
    parts = [f"{n} {row[n]['goodput']:.3f}" for n in names]
    return f"At {at:,} GPUs ({row['faults_per_day']} faults/day at Llama 3's rate): " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("docs/results"))
    ap.add_argument("--step-s", type=float, default=1.0, help="seconds per training step at scale")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--ckpt-save-s", type=float, default=5.0)
    ap.add_argument("--nccl-timeout-s", type=float, default=600.0)
    ap.add_argument("--gpus", default="1024,4800,16384,100000")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    m = measured_inputs(args.results)
    sys_ = systems(m, args.ckpt_every, args.ckpt_save_s, args.nccl_timeout_s)
    gpus = [int(x) for x in args.gpus.split(",")]
    rows = table(sys_, LLAMA3, gpus, args.step_s)
    out = {
        "model": "goodput = (1/overhead) x (1 - checkpoint share) / (1 + faults per s x mean cost per fault)",
        "failure_rate": {"per_gpu_hour": LLAMA3.per_gpu_hour, "hardware_share": LLAMA3.hardware_share},
        "failure_rate_source": LLAMA3.source,
        "step_s": args.step_s,
        "measured": {k: v for k, v in m.items() if k != "sources"},
        "measured_sources": m["sources"],
        "systems": {s.name: s.sources for s in sys_},
        "rows": rows,
        "headline": headline(rows, [s.name for s in sys_], 16384 if 16384 in gpus else gpus[-1]),
    }
    text = json.dumps(out, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
