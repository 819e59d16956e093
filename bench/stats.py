"""Pure helpers shared by the benchmark suites: summaries, ratios, slopes, Markdown tables and a
description of the machine. No I/O beyond reading /proc and the torch version."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

PHASES = ("fence", "pause", "replace", "rebuild", "restore", "resume", "verify")
METRICS = ("detection_latency_s", "planning_s", "dispatch_s", "rto_s", "steps_recomputed", "committed_steps_lost")


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """n, median, min, max of the values that are not None (None when there are none)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(xs), "median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def ratio(a: float | None, b: float | None, digits: int = 1) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys against xs (None with fewer than two distinct xs)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def log_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of ys against log10(xs): how much y grows per 10x of x (0 = flat)."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and x and x > 0]
    return slope([math.log10(x) for x, _ in pts], [y for _, y in pts])


def fmt(v: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as an em dash, thousands separated for big ints."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub Markdown table; cells go through fmt, pipes in text are escaped."""

    def cell(v: Any) -> str:
        return fmt(v, digits).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median_max(summary: dict[str, Any] | None, digits: int = 2) -> str:
    """'median (max)' for a summarize() dict."""
    if not summary or summary.get("median") is None:
        return "—"
    if summary["n"] == 1:
        return fmt(summary["median"], digits)
    return f"{fmt(summary['median'], digits)} ({fmt(summary['max'], digits)})"


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, Python, torch (if importable) and the accelerator, if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gib"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken torch must not stop the description
        info.setdefault("torch", None)
        info.setdefault("accelerator", None)
    return info


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max of every metric and phase over the incident reports that completed."""
    ok = [r for r in runs if r.get("outcome") == "done"]
    out: dict[str, Any] = {m: summarize(r.get(m) for r in ok) for m in METRICS}
    out["phases_s"] = {p: summarize((r.get("phases_s") or {}).get(p) for r in ok) for p in PHASES}
    out["runs"], out["done"] = len(runs), len(ok)
    out["bitwise_equal"] = sum(1 for r in ok if r.get("bitwise_equal_to_fault_free"))
    return out
