"""Recovery on the real job (flashrecovery/demo.py run_once), per fault class, n runs each, all
compared bitwise with one fault-free run."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from flashrecovery.cluster import states_equal
from flashrecovery.demo import run_once
from flashrecovery.shared.settings import Settings

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
