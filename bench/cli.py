"""`flashrecovery bench`: every benchmark suite, one command; JSON + Markdown + PNG charts.

    flashrecovery bench --smoke                       # seconds to a minute (CI)
    flashrecovery bench --suite recovery,baseline --runs 5
    flashrecovery bench                               # everything (long: hours on 2 cores)

Results accumulate in --out/results.json (a suite run again replaces its own section; --fresh
starts over), then summary.md and the charts are rendered from the whole file."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SUITES = ("recovery", "baseline", "torchft", "scale", "detector", "planner", "overhead", "goodput")
SMOKE_SUITES = ("planner", "detector", "scale")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(v: str) -> list[str]:
    return [p.strip() for p in v.split(",") if p.strip()]


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: recovery vs torchrun and torchft, scale, detector, planner, overhead, goodput"
    )
    p.add_argument(
        "--suite",
        type=_csv,
        default=None,
        help=f"comma-separated subset of {','.join(SUITES)} (default: all; --smoke: {','.join(SMOKE_SUITES)})",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one run of everything asked for")
    p.add_argument("--runs", type=int, default=None, help="runs per fault class (default 5; smoke 1)")
    p.add_argument("--faults", type=_csv, default=["process-crash", "node-crash", "hang", "ecc"])
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--at-step", type=int, default=15)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ckpt-every", type=lambda v: [int(x) for x in _csv(v)], default=[10, 100])
    p.add_argument(
        "--torchft-faults",
        type=_csv,
        default=["after-step"],
        help="torchft suite: after-step (SIGKILL after step S, as the baseline) and/or "
        "in-allreduce (the victim stops before the gradient all-reduce of step S+1 and is "
        "killed while its peers wait inside it)",
    )
    p.add_argument(
        "--torchft-heartbeat-ms",
        type=int,
        default=1000,
        help="torchft suite: the lighthouse's heartbeat timeout (its default is 5000)",
    )
    p.add_argument(
        "--torchft-timeout",
        type=float,
        default=30.0,
        help="torchft suite: the Manager's timeout (collectives, should_commit, healing), s; "
        "survivors that are not the dead process's ring neighbours wait this long",
    )
    p.add_argument(
        "--scale-sizes",
        type=lambda v: [int(x) for x in _csv(v)],
        default=None,
        help="ranks (default 64,1000,10000,100000; smoke 64)",
    )
    p.add_argument("--scale-warmup", type=float, default=8.0)
    p.add_argument("--scale-runs", type=int, default=3, help="runs per cluster size; rows show medians")
    p.add_argument(
        "--scale-detectors",
        type=int,
        default=None,
        help="detector instances per scale point (default: one per 8,000 heartbeats/s)",
    )
    p.add_argument(
        "--scale-heartbeat-interval",
        type=float,
        default=1.0,
        help="scale suite: every simulated node's heartbeat interval, s (the detector declares a "
        "node lost after heartbeat_misses of them)",
    )
    p.add_argument(
        "--scale-heartbeat-misses",
        type=int,
        default=None,
        help="scale suite: missed heartbeats after which the detectors declare a node lost "
        "(default: the detector setting, 3)",
    )
    p.add_argument("--overhead-reps", type=int, default=None, help="interleaved pairs (default 3; smoke 1)")
    p.add_argument("--overhead-steps", type=int, default=40)
    p.add_argument("--goodput-duration", type=float, default=600.0)
    p.add_argument("--goodput-gap", type=float, default=60.0)
    p.add_argument(
        "--goodput-runs",
        type=int,
        default=1,
        help="goodput suite: rounds, each running every system once with the same seeded faults (seed 7, 8, ...)",
    )
    p.add_argument(
        "--step-sleep",
        type=float,
        default=0.0,
        help="overhead and goodput suites: seconds every system's steps sleep (a stand-in for a bigger "
        "model's compute; the goodput suite refuses overhead results taken with another value)",
    )
    p.add_argument(
        "--goodput-torchft-timeouts",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[5.0],
        help="goodput suite: torchft Manager timeouts, s, one run each (5: tuned for fast recovery; "
        "60 is torchft's default); none: skip torchft",
    )
    p.add_argument(
        "--goodput-systems",
        type=lambda v: [x for x in v.split(",") if x],
        default=["ours", "torchrun", "torchft"],
        help="goodput suite: which systems run, comma-separated (ours, torchrun, torchft)",
    )
    p.add_argument(
        "--goodput-paired",
        action="store_true",
        help="goodput suite: every faulty run gets a fault-free twin of the same length right beside "
        "it (order alternating by round), and goodput_vs_fault_free = its work rate over the twin's",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    p.set_defaults(func=run)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    from flashrecovery.shared.logging import configure
    from flashrecovery.shared.settings import load_settings

    from .report import charts, render
    from .stats import machine_info

    configure("json", level="WARNING")
    suites = args.suite or list(SMOKE_SUITES if args.smoke else SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {','.join(SUITES)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results: dict[str, Any] = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    results.setdefault("runs", {})
    results["machine"] = {**machine_info(), "loadavg_start": _loadavg()}
    settings = load_settings()
    run_root = Path(settings.runtime_dir).resolve() / "bench"
    command = (
        "flashrecovery bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench"
        else "flashrecovery bench"
    )
    n = args.runs or (1 if args.smoke else 5)
    failed = []

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def save() -> None:
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    for suite in suites:
        t0 = time.time()
        log(f"suite {suite} ...")
        try:
            results[suite] = _run_suite(suite, args, n, settings, run_root, results, log)
        except Exception as exc:  # noqa: BLE001 - the other suites still run; the error is a result
            failed.append(suite)
            results[suite] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"suite {suite} failed: {exc!r}")
        results["runs"][suite] = {
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
            "wall_s": round(time.time() - t0, 1),
            "smoke": args.smoke,
            "loadavg_end": _loadavg(),
        }
        save()
    (args.out / "summary.md").write_text(render(_ok_sections(results)))
    made = charts(_ok_sections(results), args.out)
    log(
        f"wrote {path}, {args.out / 'summary.md'}"
        + (f", {', '.join(made)}" if made else " (no charts: pip install '.[bench]' for matplotlib)")
    )
    return 1 if failed else 0


def _torchft_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        return None
    for dist in ("torchft-nightly", "torchft"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def _ok_sections(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if not (isinstance(v, dict) and set(v) == {"error"})}


def _run_suite(
    suite: str, args: argparse.Namespace, n: int, settings, run_root: Path, results: dict[str, Any], log
) -> dict[str, Any]:
    if suite == "recovery":
        from .recovery import run_recovery

        faults = (
            args.faults
            if not args.smoke or args.faults != ["process-crash", "node-crash", "hang", "ecc"]
            else ["process-crash"]
        )
        return asyncio.run(
            run_recovery(
                faults, n, args.rank, args.at_step, args.steps, run_root / "recovery", settings, args.timeout, log
            )
        )
    if suite == "baseline":
        from .baseline import run_baseline

        runs = []
        for k in args.ckpt_every[:1] if args.smoke else args.ckpt_every:
            for i in range(1 if args.smoke else max(1, min(n, 3))):
                log(f"baseline: torchrun, checkpoint every {k}, run {i + 1}")
                try:
                    runs.append(
                        run_baseline(
                            run_root / "baseline" / f"k{k}-{i}", k, args.at_step, args.steps, args.rank, args.timeout
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    runs.append({"ckpt_every": k, "at_step": args.at_step, "error": f"{type(exc).__name__}: {exc}"})
        return {"runs": runs}
    if suite == "torchft":
        from .torchft_bench import run_torchft, torchft_available

        why = torchft_available()
        if why:
            return {"skipped": why}
        runs = []
        for fault in args.torchft_faults:
            for i in range(1 if args.smoke else max(1, min(n, 3))):
                log(f"torchft: {fault}, run {i + 1}")
                try:
                    runs.append(
                        run_torchft(
                            run_root / "torchft" / f"{fault}-{i}",
                            args.at_step,
                            args.steps,
                            args.rank,
                            args.timeout,
                            fault=fault,
                            heartbeat_timeout_ms=args.torchft_heartbeat_ms,
                            ft_timeout_s=args.torchft_timeout,
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    runs.append({"fault": fault, "at_step": args.at_step, "error": f"{type(exc).__name__}: {exc}"})
        return {"runs": runs, "torchft": _torchft_version()}
    if suite == "scale":
        from .scale import run_scale_point

        sizes = args.scale_sizes or ([64] if args.smoke else [64, 1000, 10000, 100000])
        from .scale import median_point

        points, raw = [], []
        for ranks in sizes:
            runs = []
            for i in range(1 if args.smoke else args.scale_runs):
                log(f"scale: {ranks} simulated ranks, run {i + 1}")
                try:
                    runs.append(
                        asyncio.run(
                            run_scale_point(
                                ranks,
                                run_root / "scale",
                                settings,
                                warmup_s=min(args.scale_warmup, 6.0) if args.smoke else args.scale_warmup,
                                timeout_s=args.timeout,
                                detectors=args.scale_detectors,
                                heartbeat_interval_s=args.scale_heartbeat_interval,
                                heartbeat_misses=args.scale_heartbeat_misses,
                            )
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    runs.append({"ranks": ranks, "error": f"{type(exc).__name__}: {exc}"})
            raw.extend(runs)
            points.append(median_point(runs))
        return {"points": points, "runs": raw}
    if suite == "detector":
        from . import detector_bench

        shapes = (
            [(100, 6.0, 2.3, 4.0, False)]
            if args.smoke
            else [(1250, 20.0, 8.3, 14.5, False), (12500, 20.0, 8.3, 14.5, False), (12500, 20.0, 8.3, 14.5, True)]
        )
        rows = []
        for nodes, secs, lost, crash, columns in shapes:
            log(f"detector: {nodes} nodes x 8 ranks, {secs} s, {'rank_columns' if columns else 'rank objects'}")
            rows.append(detector_bench.run(nodes, 8, secs, lost, crash, columns))
        return {"rows": rows}
    if suite == "planner":
        from . import planner_bench

        rows = planner_bench.bench([1000] if args.smoke else [1000, 10000, 100000], 3 if args.smoke else 5)
        return {"rows": rows}
    if suite == "overhead":
        from .overhead import run_overhead

        reps = args.overhead_reps or (1 if args.smoke else 3)
        return asyncio.run(
            run_overhead(reps, args.overhead_steps, run_root / "overhead", settings, args.timeout, log, args.step_sleep)
        )
    if suite == "goodput":
        if args.smoke:
            return {"skipped": "smoke"}
        return _goodput_suite(args, settings, run_root, results, log)
    raise ValueError(suite)


def _goodput_suite(args: argparse.Namespace, settings, run_root: Path, results: dict[str, Any], log) -> dict[str, Any]:
    """--goodput-runs rounds; each round runs every system once with the same seed (fault times
    and victims), so the load drifts less between the systems of one round than between rounds."""
    from .goodput import BIG, against_fault_free, goodput_ours, goodput_torchft_seeded, goodput_torchrun, pooled
    from .torchft_bench import torchft_available

    ov = results.get("overhead") or {}
    if (ov.get("step_sleep_s") or 0.0) != args.step_sleep:
        raise ValueError(
            f"the overhead results in --out were taken with --step-sleep {ov.get('step_sleep_s') or 0.0}, "
            f"not {args.step_sleep}: run the overhead suite with the same --step-sleep first"
        )
    s_ours = (ov.get("ours_s_per_step") or {}).get("median")
    s_bare = (ov.get("bare_s_per_step") or {}).get("median")
    why = torchft_available()
    systems = set(args.goodput_systems)
    if not systems or systems - {"ours", "torchrun", "torchft"}:
        raise ValueError(f"--goodput-systems takes ours, torchrun, torchft; got {sorted(systems)}")
    ours: list[dict[str, Any]] = []
    tr: dict[int, list[dict[str, Any]]] = {k: [] for k in args.ckpt_every[:1]} if "torchrun" in systems else {}
    ft: dict[float, list[dict[str, Any]]] = (
        {t: [] for t in args.goodput_torchft_timeouts} if why is None and "torchft" in systems else {}
    )
    root = run_root / "goodput"
    for i in range(args.goodput_runs):
        seed = 7 + i
        tag = f"round {i + 1}/{args.goodput_runs} (seed {seed})"
        # (name, runs, run(gap)): one system's goodput run with this round's seeded faults
        entries: list[tuple[str, list[dict[str, Any]], Any]] = []
        if "ours" in systems:
            entries.append(
                (
                    "ours",
                    ours,
                    lambda gap, seed=seed: asyncio.run(
                        goodput_ours(
                            args.goodput_duration, gap, s_ours, root, settings, seed=seed, step_sleep=args.step_sleep
                        )
                    ),
                )
            )
        for k, runs in tr.items():
            entries.append(
                (
                    f"torchrun ckpt every {k}",
                    runs,
                    lambda gap, seed=seed, k=k: goodput_torchrun(
                        args.goodput_duration,
                        gap,
                        k,
                        s_bare,
                        root / f"torchrun-k{k}",
                        seed=seed,
                        step_sleep=args.step_sleep,
                    ),
                )
            )
        for t, runs in ft.items():
            entries.append(
                (
                    f"torchft, Manager timeout {t} s, lighthouse heartbeat {args.torchft_heartbeat_ms} ms",
                    runs,
                    lambda gap, seed=seed, t=t: goodput_torchft_seeded(
                        args.goodput_duration,
                        gap,
                        root / f"torchft-t{t:g}",
                        t,
                        args.torchft_heartbeat_ms,
                        seed=seed,
                        step_sleep=args.step_sleep,
                    ),
                )
            )
        for name, runs, run_one in entries:
            if not args.goodput_paired:
                log(f"goodput {tag}: {name}, {args.goodput_duration} s, fault every ~{args.goodput_gap} s")
                runs.append(run_one(args.goodput_gap))
                continue
            # faulty and fault-free twins back to back, the order alternating by round, so that a
            # box drifting steadily over the session favours neither
            order = ("faulty", "fault-free") if i % 2 == 0 else ("fault-free", "faulty")
            got = {}
            for kind in order:
                log(f"goodput {tag}: {name}, {args.goodput_duration} s, {kind}")
                got[kind] = run_one(args.goodput_gap if kind == "faulty" else BIG)
            runs.append({**against_fault_free(got["faulty"], got["fault-free"]), "ran_first": order[0]})
    return {
        "gap_s": args.goodput_gap,
        "duration_s": args.goodput_duration,
        "step_sleep_s": args.step_sleep,
        "rounds": args.goodput_runs,
        "paired": args.goodput_paired,
        "systems": sorted(systems),
        "ours": pooled(ours) if ours else {"skipped": "not in --goodput-systems"},
        "torchrun": [pooled(runs) for runs in tr.values()] or [{"skipped": "not in --goodput-systems"}],
        "torchft": [pooled(runs) for runs in ft.values()] or [{"skipped": why or "not in --goodput-systems"}],
        "note": "goodput uses each system's fault-free s/step: ours and torchrun's from the overhead "
        "suite, torchft's from its own run before the first fault; torchft's steps count by the "
        "share of replica groups that trained them; per system the goodput is the median of its "
        "rounds (goodput_min / goodput_max: the spread; runs: each round); with paired, "
        "goodput_vs_fault_free is each faulty run's work rate over its fault-free twin's (the same "
        "system and length, run beside it)",
    }
