"""Recovery on the real job (flashrecovery/demo.py run_once), per fault class, n runs each, all
compared bitwise with one fault-free run; plus the failure-free step time of the same job."""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from flashrecovery.cluster import states_equal
from flashrecovery.demo import reference_cluster, run_once
from flashrecovery.shared.settings import BusSettings, Settings

from .stats import PHASES, slope, summarize_runs  # noqa: F401 (re-exported)


async def run_recovery(
    faults: list[str],
    n: int,
    rank: int,
    at_step: int,
    steps: int,
    run_root: Path,
    settings: Settings,
    timeout_s: float,
    log=print,
) -> dict[str, Any]:
    t0 = time.time()
    log(f"recovery: fault-free reference ({steps} steps)")
    ref = await run_once("none", rank, at_step, steps, timeout_s, True, run_root, settings)
    ref_states = ref.pop("_states")
    result: dict[str, Any] = {
        "rank": rank,
        "at_step": at_step,
        "steps": steps,
        "n": n,
        "reference_job": ref["job_id"],
        "faults": {},
    }
    for fault in faults:
        runs = []
        for i in range(n):
            log(f"recovery: {fault} run {i + 1}/{n}")
            try:
                rep = await run_once(fault, rank, at_step, steps, timeout_s, True, run_root, settings)
                eq, why = states_equal(ref_states, rep.pop("_states"))
                rep["bitwise_equal_to_fault_free"], rep["bitwise_detail"] = eq, why
            except Exception as exc:  # noqa: BLE001 - one failed run is a result, not the end
                rep = {
                    "fault": fault,
                    "outcome": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc(limit=3),
                }
            runs.append(rep)
        result["faults"][fault] = {"runs": runs, "summary": summarize_runs(runs)}
    result["wall_s"] = round(time.time() - t0, 1)
    return result


async def step_time_ours(steps: int, run_root: Path, base: Settings, timeout_s: float) -> dict[str, Any]:
    """Fault-free reference job with agent + sidecars + services: seconds per step from the
    slowest rank's committed step over time (node heartbeats, 1 Hz)."""
    job = f"overhead-{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(
        update={
            "job_id": job,
            "bus": BusSettings(topic_namespace=job, telemetry_partitions=2, control_partitions=1, linger_ms=2),
        }
    )
    cluster = reference_cluster(settings, run_root / job, steps)
    samples: list[tuple[float, int]] = []
    try:
        await cluster.start()
        deadline = time.monotonic() + timeout_s
        while not cluster.finished() and time.monotonic() < deadline:
            s = cluster.min_step()
            if s >= 2 and (not samples or s > samples[-1][1]):
                samples.append((time.monotonic(), s))
            await asyncio.sleep(0.05)
    finally:
        await cluster.stop()
    steady = [(t, s) for t, s in samples if s < steps]
    sec = slope([s for _, s in steady], [t for t, _ in steady])
    return {"s_per_step": round(sec, 4) if sec else None, "samples": len(steady), "job": job}
