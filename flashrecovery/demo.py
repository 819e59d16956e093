"""`flashrecovery demo`: the whole system on this machine, one fault, one incident report."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .agent.reference.recipe import OPTIMIZERS
from .cluster import FAULTS, LocalCluster, WorkerSpec, states_equal
from .scenario import SERVICE_FAULTS, FollowUp, ScenarioLog, ServiceFault, escalations, run_followups, wait_settled
from .secure import start_secure_stack
from .shared.logging import configure
from .shared.schemas import Escalation, FaultIncident, RecoveryCompleted, RecoveryPlan, RecoveryProgress
from .shared.settings import BusSettings, load_settings

REFERENCE_JOB = "flashrecovery.agent.reference.train"
STACK_FAULTS = ("broker", "redis", "redis-restart")


def reference_cluster(
    settings, run_dir: Path, steps: int, worker_args: str = "", tp: int = 2, **kw: Any
) -> LocalCluster:
    """A LocalCluster running the reference job (agent/reference/train.py): `steps` steps of a
    dp x tp GPT, every rank saving its final state to the cluster's out_dir; `worker_args`: more
    of its flags (--step-sleep, --optimizer, ...)."""
    out_dir = run_dir / "final"
    args = ("--steps", str(steps), "--tp", str(tp), "--out", str(out_dir), *shlex.split(worker_args))
    return LocalCluster(settings, run_dir, WorkerSpec(module=REFERENCE_JOB, args=args), tp=tp, out_dir=out_dir, **kw)


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="train 4 nodes x 2 ranks + a spare, inject a fault, report recovery")
    p.add_argument("--fault", choices=FAULTS, default="process-crash")
    p.add_argument("--rank", type=int, default=2, help="the rank the fault hits")
    p.add_argument("--at-step", type=int, default=12)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--verify", action="store_true", help="also run fault-free and compare final state")
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the ranks keep their tensors (cuda: all ranks share GPU 0, gloo)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="the job's optimizer")
    p.add_argument("--spares", type=int, default=1, help="spare nodes with standbys (0: none)")
    p.add_argument(
        "--then",
        action="append",
        default=[],
        type=_parsed(FollowUp.parse),
        metavar="KIND:RANK:DELAY_S",
        help="a further worker fault (process-crash|hang|node-crash) DELAY_S after the "
        "first incident is detected; repeatable",
    )
    p.add_argument(
        "--service-fault",
        action="append",
        default=[],
        type=_parsed(ServiceFault.parse),
        metavar="NAME:DELAY_S",
        help=f"{' | '.join(SERVICE_FAULTS)}, DELAY_S after the first incident; repeatable",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="SASL/SCRAM + TLS to the broker (a gateway in front of the embedded one), signed "
        "incidents, plans and commands, and a Redis ACL user per role limited to the job's keys",
    )
    p.set_defaults(func=run)


def _parsed(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _printer(quiet: bool):
    t0 = time.time()

    def show(ev: Any) -> None:
        if quiet:
            return
        at = f"[{time.time() - t0:6.2f}s]"
        if isinstance(ev, FaultIncident):
            print(
                f"{at} INCIDENT {ev.fault_class} on {','.join(ev.root_cause_nodes)} ranks "
                f"{list(ev.root_cause_ranks)} ({ev.reason[:90]})",
                flush=True,
            )
        elif isinstance(ev, RecoveryPlan):
            moves = ", ".join(f"r{r.rank}:{r.from_node}->{r.to_node}" for r in ev.replacements)
            print(
                f"{at} PLAN     restart {list(ev.restart_ranks)} [{moves}] sources "
                f"{[(t.src, t.dst) for t in ev.transfers]}",
                flush=True,
            )
        elif isinstance(ev, RecoveryProgress):
            print(f"{at} PHASE    {ev.phase:<8} {ev.status}", flush=True)
        elif isinstance(ev, RecoveryCompleted):
            print(
                f"{at} DONE     {ev.outcome} rto {ev.rto_s}s recovery step {ev.recovery_step}"
                f"{' (' + ev.reason[:120] + ')' if ev.outcome != 'done' and ev.reason else ''}",
                flush=True,
            )
        elif isinstance(ev, Escalation):
            print(f"{at} ESCALATED {ev.reason[:200]}", flush=True)

    return show


async def _status_line(cluster: LocalCluster, stop: asyncio.Event, quiet: bool) -> None:
    while not stop.is_set() and not quiet:
        view = cluster.timeline.rank_view()
        cells = " ".join(f"r{r}:{s.state[:4]}@{s.step}" for r, (_, s) in sorted(view.items()))
        print(f"         ranks {cells}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except TimeoutError:
            pass


async def run_once(
    fault: str,
    rank: int,
    at_step: int,
    steps: int,
    timeout_s: float,
    quiet: bool,
    run_root: Path,
    base_settings,
    worker_args: str = "",
    then: list[FollowUp] | None = None,
    service_faults: list[ServiceFault] | None = None,
    spares: int = 1,
    secure: bool = False,
) -> dict[str, Any]:
    job = f"demo-{fault}-{uuid.uuid4().hex[:6]}"
    settings = base_settings.model_copy(
        update={
            "job_id": job,
            "bus": BusSettings(topic_namespace=job, telemetry_partitions=2, control_partitions=1, linger_ms=2),
        }
    )
    secure_run = None
    if secure:
        # the run's own stack, gateway in front of the broker; every process of the run gets
        # these settings (the supervisor passes them on, with its kind's Kafka principal and
        # Redis user) and the cluster starts no stack
        secure_run = start_secure_stack((run_root / job).resolve(), settings)
        settings = secure_run.settings
    cluster = reference_cluster(
        settings,
        run_root / job,
        steps,
        worker_args,
        spares=spares,
        fault_env=LocalCluster.fault_env_for(fault, rank, at_step),
        on_event=_printer(quiet),
        kafka_principals=secure_run.kafka_principals if secure_run else {},
        redis_urls=secure_run.redis_urls if secure_run else {},
    )
    stop = asyncio.Event()
    started = time.time()
    try:
        await cluster.start()
        if not quiet:
            print(
                f"stack, services, 4 nodes x 2 ranks and a spare up in {time.time() - started:.1f}s "
                f"(logs: {cluster.run_dir})",
                flush=True,
            )
        ticker = asyncio.create_task(_status_line(cluster, stop, quiet))
        await cluster.wait_until(lambda: cluster.min_step() >= 1, timeout_s, "training to start")
        pids_before = {r: s.pid for r, (_, s) in cluster.timeline.rank_view().items()}
        fault_at = await cluster.inject(fault, rank, at_step, timeout_s)
        log = ScenarioLog()
        await run_followups(cluster, then or [], service_faults or [], timeout_s, log)
        if fault != "none":
            await cluster.wait_until(
                lambda: any(c.outcome != "superseded" for c in cluster.timeline.completed),
                timeout_s,
                "the recovery to complete",
            )
        ending = await wait_settled(cluster, timeout_s)
        stop.set()
        await ticker
        rep = _report(cluster, fault, rank, at_step, fault_at, pids_before, ending == "escalated")
        rep.setdefault("device", worker_args)
        rep["scenario"] = log.actions
        return rep
    finally:
        stop.set()
        await cluster.stop()
        if secure_run is not None:
            secure_run.stack.stop()


def _report(
    cluster: LocalCluster,
    fault: str,
    rank: int,
    at_step: int,
    fault_at: float,
    pids_before: dict[int, int],
    escalated_for_good: bool = False,
) -> dict[str, Any]:
    tl = cluster.timeline
    escalated = escalations(cluster)
    if escalated_for_good:
        return {
            "fault": fault,
            "rank": rank,
            "at_step": at_step,
            "job_id": cluster.settings.job_id,
            "outcome": "escalated",
            "reason": "; ".join(e.reason for e in escalated),
            "recoveries": _recoveries(tl),
            "_states": None,
        }
    final = cluster.final_states()
    rep: dict[str, Any] = {
        "fault": fault,
        "rank": rank,
        "at_step": at_step,
        "job_id": cluster.settings.job_id,
        "final_step": {r: s["step"] for r, s in final.items()},
        "_states": final,
    }
    # the plan that brought training back: the last one done (earlier ones may have failed or
    # been superseded in a multi-fault run)
    done = next((c for c in reversed(tl.completed) if c.outcome == "done"), None)
    if fault == "none" or done is None:
        rep["outcome"] = "no fault" if fault == "none" else "no recovery seen"
        return rep
    plan = next(p for p in tl.plans if p.plan_id == done.plan_id)
    incident = next((i for i in tl.incidents if i.incident_id in plan.incident_ids), None)
    marks: dict[tuple[str, str], float] = {}
    for p in tl.progress:
        if p.plan_id == done.plan_id:
            marks[(p.phase, str(p.status))] = p.at
    phases = {
        ph: round(marks[(ph, "completed")] - marks[(ph, "started")], 3)
        for ph in ("fence", "pause", "replace", "rebuild", "restore", "resume", "verify")
        if (ph, "completed") in marks and (ph, "started") in marks
    }
    restarted = set(plan.restart_ranks)
    survivors = {r: pid for r, pid in pids_before.items() if r not in restarted}
    unchanged = all(final[r]["pid"] == pid for r, pid in survivors.items())
    rep.update(
        {
            "outcome": done.outcome,
            "fault_class": str(done.fault_class),
            "incident_id": done.incident_id,
            "plan_id": done.plan_id,
            "restart_ranks": sorted(restarted),
            "moved_to": {r.rank: r.to_node for r in plan.replacements},
            "detection_latency_s": round(incident.detected_at - fault_at, 3) if incident else None,
            "planning_s": round(plan.emitted_at - incident.detected_at, 3) if incident else None,
            "dispatch_s": round(marks.get(("fence", "started"), plan.emitted_at) - plan.emitted_at, 3),
            "phases_s": phases,
            "rto_s": round(marks[("verify", "completed")] - fault_at, 3) if ("verify", "completed") in marks else None,
            "recovery_step": done.recovery_step,
            "steps_recomputed": done.steps_recomputed,
            "committed_steps_lost": done.committed_steps_lost,
            "committed_steps_lost_observed": committed_steps_lost_observed(tl, fault_at, done.recovery_step),
            "survivor_pids_unchanged": unchanged,
            "survivors": len(survivors),
            "commit_rule": done.reason,
            "recoveries": _recoveries(tl),
        }
    )
    return rep


def committed_steps_lost_observed(tl, fault_at: float, resume_step: int | None) -> int | None:
    """Steps every rank had applied before the fault (heartbeats seen by the watcher) that the
    job did again after the recovery: independent of the executor's own figure."""
    if resume_step is None:
        return None
    return max(0, tl.committed_before(fault_at) - (resume_step - 1))


def _recoveries(tl) -> list[dict[str, Any]]:
    """Every plan that ended, in order: a multi-fault run has several (superseded ones too)."""
    return [
        {
            "plan_id": c.plan_id,
            "outcome": c.outcome,
            "rto_s": c.rto_s,
            "recovery_step": c.recovery_step,
            "committed_steps_lost": c.committed_steps_lost,
            "reason": c.reason,
        }
        for c in tl.completed
    ]


def print_report(rep: dict[str, Any], verify: tuple[bool, str] | None) -> None:
    print("\n=== FlashRecovery incident report ===")
    print(f"fault            {rep['fault']} on rank {rep['rank']} at step {rep['at_step']}")
    for a in rep.get("scenario", []):
        print(f"then             {a['what']}")
    if rep["outcome"] == "escalated":
        print(f"outcome          ESCALATED: {rep['reason']}")
        return
    if len(rep.get("recoveries", [])) > 1:
        for c in rep["recoveries"]:
            print(f"recovery         {c['outcome']:<10} rto {c['rto_s']} s  {c['plan_id']}")
    if "plan_id" not in rep:
        print(f"outcome          {rep['outcome']}")
    else:
        print(f"classified as    {rep['fault_class']}; restarted ranks {rep['restart_ranks']} -> {rep['moved_to']}")
        print(f"detection        {rep['detection_latency_s']:.3f} s  (fault -> incident)")
        print(f"planning         {rep['planning_s']:.3f} s  (incident -> plan)")
        for ph, sec in rep["phases_s"].items():
            print(f"  {ph:<14} {sec:.3f} s")
        rto = "n/a" if rep["rto_s"] is None else f"{rep['rto_s']:.3f} s"
        print(f"RTO              {rto}  (fault -> every rank committed the first step after recovery)")
        print(
            f"recovery step    {rep['recovery_step']}; steps recomputed {rep['steps_recomputed']}; "
            f"committed steps lost {rep['committed_steps_lost']} (executor), "
            f"{rep['committed_steps_lost_observed']} (seen in heartbeats)"
        )
        print(
            f"survivor PIDs    {'unchanged' if rep['survivor_pids_unchanged'] else 'CHANGED'} ({rep['survivors']} ranks kept their processes)"
        )
        print(f"commit rule      {rep['commit_rule']}")
    print(f"final steps      {sorted(set(rep['final_step'].values()))}")
    if verify is not None:
        print(f"vs fault-free    {'BITWISE EQUAL' if verify[0] else 'DIFFERENT: ' + verify[1]}")


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure("console" if sys.stderr.isatty() else "json", level="WARNING")
    run_root = Path(settings.runtime_dir).resolve() / "demo"
    # A fault is injected when a 1 Hz heartbeat shows the rank at --at-step; on a quiet machine
    # the bare job's steps (~0.08 s) could finish before that. Sleeping after each commit keeps
    # the run observable and changes nothing in the math.
    worker_args = f"--device {args.device} --step-sleep 0.1 --optimizer {args.optimizer}"
    if args.secure and (stack_faults := [f.name for f in args.service_fault if f.name in STACK_FAULTS]):
        # they restart the stack's processes, which a secure run owns outside the cluster
        print(f"--secure does not combine with --service-fault {', '.join(stack_faults)}", file=sys.stderr)
        return 2

    async def go() -> tuple[dict, tuple[bool, str] | None]:
        reference = None
        if args.verify:
            print("fault-free reference run ...", flush=True)
            reference = await run_once(
                "none",
                args.rank,
                args.at_step,
                args.steps,
                args.timeout,
                True,
                run_root,
                settings,
                worker_args,
                secure=args.secure,
            )
        print(f"run with fault {args.fault} on rank {args.rank} at step {args.at_step} ...", flush=True)
        rep = await run_once(
            args.fault,
            args.rank,
            args.at_step,
            args.steps,
            args.timeout,
            args.quiet,
            run_root,
            settings,
            worker_args,
            args.then,
            args.service_fault,
            args.spares,
            args.secure,
        )
        verdict = None
        if reference and rep["_states"] is not None:
            verdict = states_equal(reference["_states"], rep["_states"])
        return rep, verdict

    rep, verdict = asyncio.run(go())
    print_report(rep, verdict)
    rep.pop("_states")
    if verdict is not None:
        rep["bitwise_equal_to_fault_free"] = verdict[0]
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, default=str))
    ok = rep.get("outcome") in ("done", "no fault") and (verdict is None or verdict[0])
    return 0 if ok else 1
