"""Planner latency and memory at 1k / 10k / 100k ranks.

For each size and layout (8 ranks a node: dp x tp=8, dp x tp=4 x pp=2, dp x tp=2 x pp=4) and
each fault set (one node; 1% of nodes at once) it measures, separately:

- parse: JobSnapshot.model_validate_json of the snapshot (what reading the registry costs);
- arrays: PlanInput.build(snapshot), the one pass that turns records into numpy columns;
- registry rows: PlanInput.from_rows over the registry's raw JSON values (the service's path,
  which skips the JobSnapshot objects: it replaces parse + arrays);
- plan: core.plan over the prepared PlanInput (median of --runs), the decision itself;
- peak memory (tracemalloc) of arrays and of plan.

    python -m flashrecovery.bench.planner_bench [--sizes 1000 10000 100000] [--runs 7]

Prints a Markdown table and writes JSON to bench/results/planner.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import tracemalloc
from pathlib import Path

from flashrecovery.planner import PlanInput, Policy, plan
from flashrecovery.shared.schemas import FaultClass, FaultIncident, RecoveryPlan, RepairAction
from flashrecovery.shared.topology import JobSnapshot, grid_topology

RANKS_PER_NODE = 8
LAYOUTS = {"tp8": (8, 1), "tp4pp2": (4, 2), "tp2pp4": (2, 4)}
NOW = 1_000_000.0
RESULTS = Path(__file__).resolve().parent / "results" / "planner.json"


def make_snapshot(ranks: int, tp: int, pp: int) -> JobSnapshot:
    nodes = ranks // RANKS_PER_NODE
    spares = max(2, nodes // 50)  # 2% spare nodes: room for the 1% fault set
    return grid_topology("bench", nodes=nodes, ranks_per_node=RANKS_PER_NODE, tp=tp, pp=pp, spares=spares).model_copy(
        update={"committed_step": 1000}
    )


def incidents_for(nodes: int, fraction: float | None) -> list[FaultIncident]:
    count = 1 if fraction is None else max(1, round(nodes * fraction))
    stride = max(1, nodes // count)
    return [
        FaultIncident(
            job_id="bench",
            generation=0,
            producer="bench",
            incident_id=f"inc-{i}",
            fault_class=FaultClass.NODE_LOST,
            action=RepairAction.REPLACE_NODE,
            root_cause_nodes=(f"node-{(i * stride + 3) % nodes}",),
            first_seen_at=NOW - 2,
            detected_at=NOW - 1,
        )
        for i in range(count)
    ]


def timed(fn, runs: int, cpu: list[float] | None = None) -> tuple[float, object]:
    """Median wall ms over runs (and median CPU ms into `cpu`, which a loaded machine does not
    inflate)."""
    out = None
    wall, proc = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - t0)
        proc.append(time.process_time() - c0)
    if cpu is not None:
        cpu.append(statistics.median(proc) * 1e3)
    return statistics.median(wall) * 1e3, out


def peak_kib(fn) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1024


def bench(sizes: list[int], runs: int) -> list[dict]:
    rows: list[dict] = []
    for ranks in sizes:
        for layout, (tp, pp) in LAYOUTS.items():
            rows += _one_layout(ranks, layout, tp, pp, runs)
            gc.collect()  # the 100k-rank snapshot and arrays of this layout are gone with its frame
    return rows


def _one_layout(ranks: int, layout: str, tp: int, pp: int, runs: int) -> list[dict]:
    policy = Policy()
    snap = make_snapshot(ranks, tp, pp)
    raw = snap.model_dump_json()
    parse_ms, parsed = timed(lambda: JobSnapshot.model_validate_json(raw), 1 if ranks >= 100_000 else 3)
    arrays_ms, inp = timed(lambda: PlanInput.build(parsed), 3)
    # the service's path: the registry's raw hashes straight to arrays
    meta = {
        "generation": 0,
        "committed_step": snap.committed_step,
        "world_size": snap.world_size,
        "dp": snap.dp,
        "tp": tp,
        "pp": pp,
    }
    rank_rows = [r.model_dump_json().encode() for r in snap.ranks]
    node_rows = [n.model_dump_json().encode() for n in snap.nodes]
    rows_ms, _ = timed(lambda: PlanInput.from_rows("bench", meta, rank_rows, node_rows), 1 if ranks >= 100_000 else 3)
    arrays_kib = peak_kib(lambda: PlanInput.build(parsed))
    nodes = ranks // RANKS_PER_NODE
    rows = []
    for fault, fraction in (("1 node", None), ("1% nodes", 0.01)):
        incs = incidents_for(nodes, fraction)
        plan(inp, incs, policy, NOW)  # warm-up
        cpu: list[float] = []
        plan_ms, result = timed(lambda: plan(inp, incs, policy, NOW), runs, cpu)
        assert isinstance(result, RecoveryPlan) and result.fallback.value == "none", result
        rows.append(
            {
                "ranks": ranks,
                "layout": layout,
                "fault": fault,
                "faulty_nodes": len(incs),
                "restarted": len(result.restart_ranks),
                "rebuild_groups": len(result.rebuild_groups),
                "parse_ms": round(parse_ms, 2),
                "arrays_ms": round(arrays_ms, 2),
                "registry_rows_ms": round(rows_ms, 2),
                "plan_ms": round(plan_ms, 3),
                "plan_cpu_ms": round(cpu[0], 3),
                "arrays_peak_kib": round(arrays_kib, 1),
                "plan_peak_kib": round(peak_kib(lambda: plan(inp, incs, policy, NOW)), 1),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| ranks | layout | fault (nodes) | restarted | groups | plan ms (median wall) "
        "| plan CPU ms | plan peak KiB | arrays ms | arrays peak KiB | snapshot parse ms "
        "| registry rows -> arrays ms |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['ranks']:,} | {r['layout']} | {r['fault']} ({r['faulty_nodes']}) | "
            f"{r['restarted']} | {r['rebuild_groups']} | {r['plan_ms']:.2f} | {r['plan_cpu_ms']:.2f} | "
            f"{r['plan_peak_kib']:.0f} | {r['arrays_ms']:.1f} | "
            f"{r['arrays_peak_kib']:.0f} | {r['parse_ms']:.0f} | "
            f"{r['registry_rows_ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = bench(args.sizes, args.runs)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "python": platform.python_version(),
                "processor": platform.processor() or platform.machine(),
                "runs": args.runs,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
