"""Turns bench/results/results.json into the Markdown summary and the PNG charts.

Rendering is pure (dict -> str) so it is unit-tested; charts need matplotlib (the `bench` extra)
and are skipped with a note when it is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .stats import fmt, log_slope, md_table, median_max, ratio

PHASES = ("detect", "plan", "fence", "pause", "replace", "rebuild", "restore", "resume", "verify")


def recovery_phase_medians(fault_summary: dict[str, Any]) -> dict[str, float]:
    """Median seconds per phase of one fault class, detection and planning included."""
    s = fault_summary
    out = {
        "detect": (s.get("detection_latency_s") or {}).get("median"),
        "plan": (s.get("planning_s") or {}).get("median"),
    }
    for p, v in (s.get("phases_s") or {}).items():
        out[p] = (v or {}).get("median")
    return {k: float(v) for k, v in out.items() if v is not None}


def recovery_table(rec: dict[str, Any]) -> str:
    rows = []
    for fault, body in rec.get("faults", {}).items():
        s = body["summary"]
        ph = s.get("phases_s", {})
        rows.append(
            [
                fault,
                f"{s['done']}/{s['runs']}",
                median_max(s["detection_latency_s"]),
                median_max(s["planning_s"]),
                median_max(ph.get("pause")),
                median_max(ph.get("replace")),
                median_max(ph.get("rebuild")),
                median_max(ph.get("restore")),
                median_max(ph.get("verify")),
                median_max(s["rto_s"]),
                median_max(s["steps_recomputed"], 0),
                median_max(s["committed_steps_lost"], 0),
                f"{s['bitwise_equal']}/{s['done']}",
            ]
        )
    return md_table(
        [
            "fault",
            "done",
            "detect s",
            "plan s",
            "pause s",
            "replace s",
            "rebuild s",
            "restore s",
            "verify s",
            "RTO s",
            "steps recomputed",
            "committed lost",
            "bitwise = fault-free",
        ],
        rows,
    )


def baseline_table(base: dict[str, Any], ours_rto: float | None) -> str:
    rows = []
    if ours_rto is not None:
        rows.append(["FlashRecovery (process-crash, median)", "—", fmt(ours_rto), "—", "—", "1.0"])
    for r in base.get("runs", []):
        if "error" in r:
            rows.append([f"torchrun K={r.get('ckpt_every')}", r.get("at_step"), "error", "—", "—", r["error"][:60]])
            continue
        rows.append(
            [
                f"torchrun --max-restarts=3, ckpt every {r['ckpt_every']}",
                r["at_step"],
                fmt(r["rto_s"]),
                r["steps_recomputed"],
                r["processes_restarted"],
                fmt(ratio(r["rto_s"], ours_rto)),
            ]
        )
    return md_table(
        [
            "system",
            "fault at step",
            "RTO s",
            "steps recomputed (= committed lost)",
            "processes restarted",
            "RTO / ours",
        ],
        rows,
    )


def torchft_table(tft: dict[str, Any], ours_rto: float | None) -> str:
    """One row per torchft run, the columns of baseline_table plus what only torchft has."""
    rows = []
    if ours_rto is not None:
        rows.append(
            [
                "FlashRecovery (process-crash, median)",
                "—",
                "—",
                "—",
                fmt(ours_rto),
                "—",
                "—",
                "0",
                "—",
                "—",
                "1",
                "—",
                "1.0",
            ]
        )
    for r in tft.get("runs", []):
        name = f"torchft, {r.get('replicas', '?')} groups x tp {r.get('tp', '?')}"
        if "error" in r:
            rows.append([name, r.get("fault"), r.get("at_step"), "—", "error: " + r["error"][:60]] + ["—"] * 8)
            continue
        crashed = r.get("survivor_groups_crashed") or []
        kept = fmt(r["survivors_pids_kept"]) + (f" (group {', '.join(map(str, crashed))} crashed)" if crashed else "")
        rows.append(
            [
                name,
                r["fault"],
                r["at_step"],
                fmt(r.get("ft_timeout_s")),
                fmt(r["rto_s"]) if r.get("restarted_group_rejoined") else "did not rejoin",
                fmt(r.get("rto_survivors_s")),
                r["steps_recomputed"],
                r["committed_steps_lost"],
                r["microbatches_dropped"],
                kept,
                r["processes_restarted"],
                fmt(r.get("replicas_consistent")),
                fmt(ratio(r.get("rto_s"), ours_rto)),
            ]
        )
    return md_table(
        [
            "system",
            "fault",
            "at step",
            "torchft timeout s",
            "RTO s (restarted group commits)",
            "survivors commit s",
            "steps recomputed",
            "committed lost",
            "micro-batches dropped",
            "survivors' pids kept",
            "processes restarted",
            "replicas equal at end",
            "RTO / ours",
        ],
        rows,
    )


def scale_table(points: list[dict[str, Any]]) -> str:
    rows = []
    for p in points:
        if "error" in p:
            rows.append([p["ranks"], p.get("nodes"), "error: " + p["error"][:60]] + ["—"] * 9)
            continue
        ph = p.get("phases_s", {})
        rows.append(
            [
                p["ranks"],
                p["nodes"],
                fmt(p.get("detection_s")),
                fmt(p.get("planning_s")),
                fmt(ph.get("fence")),
                fmt(ph.get("pause")),
                fmt(ph.get("replace")),
                fmt(sum(ph.get(k, 0) for k in ("rebuild", "restore", "resume", "verify")), 2),
                fmt(p.get("recovery_after_detection_s")),
                fmt(p.get("rto_s")),
                fmt(p.get("rto_max_s")),
                p.get("runs", 1),
                p.get("detector_instances", 1),
                p.get("redis_commands"),
                p.get("kafka_control_messages"),
            ]
        )
    return md_table(
        [
            "ranks",
            "nodes",
            "detect s",
            "plan s",
            "fence s",
            "pause s",
            "replace s",
            "recover stages s",
            "detect -> done s",
            "RTO s (median)",
            "RTO max s",
            "runs",
            "detectors",
            "Redis cmds",
            "Kafka control msgs",
        ],
        rows,
    )


def scale_slopes(points: list[dict[str, Any]]) -> dict[str, float | None]:
    ok = [p for p in points if "error" not in p]
    xs = [p["ranks"] for p in ok]
    return {
        "rto_s_per_10x": _r(log_slope(xs, [p.get("rto_s") for p in ok])),
        "after_detection_s_per_10x": _r(log_slope(xs, [p.get("recovery_after_detection_s") for p in ok])),
        "redis_cmds_per_10x": _r(log_slope(xs, [p.get("redis_commands") for p in ok])),
        "kafka_msgs_per_10x": _r(log_slope(xs, [p.get("kafka_control_messages") for p in ok])),
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    out = [
        "# FlashRecovery benchmark summary",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB, torch {m.get('torch')}, "
        f"accelerator {m.get('accelerator') or 'none'}; load average at start {m.get('loadavg_start')}.",
        "",
    ]
    for name, run in results.get("runs", {}).items():
        out.append(f"- `{name}`: `{run.get('command')}` at {run.get('started')} ({run.get('wall_s')} s)")
    out.append("")
    rec = results.get("recovery")
    ours_rto = None
    if rec:
        out += [f"## Recovery on the real job (n={rec['n']} per class; median (max))", "", recovery_table(rec), ""]
        pc = rec["faults"].get("process-crash", {}).get("summary", {})
        ours_rto = (pc.get("rto_s") or {}).get("median")
    if results.get("baseline"):
        out += ["## Baseline: torchrun, same job, same fault", "", baseline_table(results["baseline"], ours_rto), ""]
    tft = results.get("torchft")
    if tft and tft.get("skipped"):
        out += ["## TorchFT, same job, same fault", "", f"Skipped: {tft['skipped']}", ""]
    elif tft:
        out += [
            "## TorchFT, same job, same fault" + (f" ({tft['torchft']})" if tft.get("torchft") else ""),
            "",
            torchft_table(tft, ours_rto),
            "",
            "RTO: fault -> the restarted replica group commits its first step (healed from a live "
            "group). Survivors commit: fault -> every other group has committed a step. Micro-batches "
            "dropped: data not trained while a group was down or healing (torchft does not recompute it).",
            "",
        ]
    sc = results.get("scale")
    if sc:
        out += [
            "## Scale: real control plane, simulated sidecars (8 ranks/node)",
            "",
            scale_table(sc["points"]),
            "",
            "Slope per 10x ranks: " + ", ".join(f"{k} {fmt(v)}" for k, v in scale_slopes(sc["points"]).items()),
            "",
        ]
    det = results.get("detector")
    if det:
        rows = [
            [
                r["ranks"],
                r["nodes"],
                r.get("form", "rank objects"),
                r["messages_per_s"],
                r["detector_cpu_s_per_wall_s"],
                r["detector_cpu_us_per_message"],
                r["node_lost_latency_from_last_beat_s"],
                r["crash_latency_s"],
                r["false_incidents"],
            ]
            for r in det.get("rows", [])
        ]
        out += [
            "## Detector ingest (bench/detector_bench.py, core path)",
            "",
            md_table(
                [
                    "ranks",
                    "nodes",
                    "heartbeat form",
                    "msgs/s",
                    "CPU s / wall s",
                    "CPU µs / msg",
                    "node-lost latency s",
                    "crash latency s",
                    "false incidents",
                ],
                rows,
                3,
            ),
            "",
        ]
    pl = results.get("planner")
    if pl:
        rows = [
            [r["ranks"], r["layout"], r["fault"], r["restarted"], r["plan_ms"], r["plan_cpu_ms"], r["registry_rows_ms"]]
            for r in pl.get("rows", [])
        ]
        out += [
            "## Planner latency (bench/planner_bench.py)",
            "",
            md_table(
                ["ranks", "layout", "fault", "restarted", "plan ms", "plan CPU ms", "registry rows -> arrays ms"], rows
            ),
            "",
        ]
    ov = results.get("overhead")
    if ov:
        out += [
            "## Failure-free overhead",
            "",
            md_table(
                ["", "s/step median (max)", "runs"],
                [["agent + sidecar + services", median_max(ov["ours_s_per_step"], 4), ov["reps"]]]
                + (
                    [
                        [
                            "agent only (torchrun, no sidecar, no services)",
                            median_max(ov["agent_only_s_per_step"], 4),
                            ov["reps"],
                        ]
                    ]
                    if ov.get("agent_only_s_per_step")
                    else []
                )
                + [["bare gloo loop (torchrun, no agent)", median_max(ov["bare_s_per_step"], 4), ov["reps"]]],
            ),
            "",
            f"Ratio ours / bare: {fmt(ov.get('ratio'), 3)}"
            + (
                f"; agent only / bare: {fmt(ov.get('agent_only_ratio'), 3)}; ours / agent only "
                f"(the deployment on the same cores): {fmt(ov.get('deployment_ratio'), 3)}"
                if ov.get("agent_only_ratio") is not None
                else ""
            ),
            "",
        ]
    cores = (ov or {}).get("cpu_cores_median")
    if cores:
        variants = [("ours", "agent + sidecar + services"), ("agent_only", "agent only"), ("bare", "bare loop")]
        names = list(dict.fromkeys(k for v, _ in variants for k in cores.get(v, {})))
        out += [
            "Cores used per process family in the timed window (median of the runs):",
            "",
            md_table(
                ["process family", *[label for _, label in variants]],
                [[n, *[cores.get(v, {}).get(n) for v, _ in variants]] for n in names],
                3,
            ),
            "",
        ]
    gp = results.get("goodput")
    if gp:

        def row(name: str, r: dict[str, Any]) -> list[Any]:
            spread = (
                f"{fmt(r.get('goodput_min'), 3)}-{fmt(r.get('goodput_max'), 3)}"
                if r.get("goodput_min") is not None
                else ""
            )
            return [
                name,
                r.get("n", 1),
                r.get("duration_s"),
                len(r.get("faults", [])),
                r.get("net_steps"),
                r.get("steps_per_s"),
                r.get("goodput"),
                spread,
                r.get("goodput_vs_lead_in"),
                _median_and_spread(r, "goodput_vs_fault_free"),
            ]

        rows = [row("FlashRecovery", gp["ours"])] if "skipped" not in gp["ours"] else []
        rows += [
            row(f"torchrun ckpt every {r.get('ckpt_every')}", r) for r in gp.get("torchrun", []) if "skipped" not in r
        ]
        rows += [
            row(f"TorchFT, timeout {r.get('ft_timeout_s')} s, heartbeat {r.get('heartbeat_timeout_ms')} ms", r)
            for r in gp.get("torchft", [])
            if "skipped" not in r
        ]
        sleep = f", steps sleep {gp['step_sleep_s']} s" if gp.get("step_sleep_s") else ""
        out += [
            f"## Goodput (fault every ~{gp['gap_s']} s{sleep})",
            "",
            md_table(
                [
                    "system",
                    "runs",
                    "wall s (median)",
                    "faults (all runs)",
                    "net steps (median)",
                    "steps/s (median)",
                    "goodput (median)",
                    "goodput min-max",
                    "vs own lead-in (median)",
                    "vs fault-free twin: median (min-max)",
                ],
                rows,
                3,
            ),
            "",
        ]
    return "\n".join(out) + "\n"


def _median_and_spread(r: dict[str, Any], key: str) -> str | None:
    """ "m (lo-hi)" of a pooled key, None where no run had it."""
    if r.get(key) is None:
        return None
    return f"{fmt(r[key], 3)} ({fmt(r.get(key + '_min'), 3)}-{fmt(r.get(key + '_max'), 3)})"


def charts(results: dict[str, Any], out_dir: Path) -> list[str]:
    """rto_phases.png (stacked bar per fault class) and rto_vs_scale.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    rec = results.get("recovery")
    if rec and rec.get("faults"):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        faults = list(rec["faults"])
        bottoms = [0.0] * len(faults)
        for ph in PHASES:
            vals = [recovery_phase_medians(rec["faults"][f]["summary"]).get(ph, 0.0) for f in faults]
            if any(vals):
                ax.bar(faults, vals, bottom=bottoms, label=ph)
                bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.set_ylabel("seconds (median)")
        ax.set_title("RTO phases per fault class (real job, 2-core CPU)")
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        fig.savefig(out_dir / "rto_phases.png", dpi=110)
        plt.close(fig)
        made.append("rto_phases.png")
    sc = results.get("scale")
    pts = [p for p in (sc or {}).get("points", []) if "error" not in p]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [p["ranks"] for p in pts]
        ax.plot(xs, [p["rto_s"] for p in pts], "o-", label="fault -> RecoveryCompleted")
        ax.plot(xs, [p.get("recovery_after_detection_s") for p in pts], "s--", label="detection -> done")
        ax.plot(xs, [p.get("detection_s") for p in pts], "^:", label="detection")
        ax.set_xscale("log")
        ax.set_xlabel("ranks (8 per node, simulated)")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.set_title("RTO against cluster size (real control plane)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "rto_vs_scale.png", dpi=110)
        plt.close(fig)
        made.append("rto_vs_scale.png")
    return made
