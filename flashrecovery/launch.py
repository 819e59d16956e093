"""`flashrecovery run`: a torchrun-compatible launcher that is the node's sidecar.

  flashrecovery run --standalone --nproc-per-node N [--standbys K] [--tp T] script.py ARGS...
  flashrecovery run --standalone --nproc-per-node N -m some.module ARGS...
  flashrecovery run --nproc-per-node N --nnodes M --node-rank I script.py ARGS...

--standalone starts everything on this machine (broker, Redis, rendezvous store, detector,
planner, two executors, the job's topology, one sidecar for the N ranks and, with --standbys K,
a spare node keeping K standbys, and one warm standby on each node for restarts in place), waits for every rank to finish and stops all of it. Without
it, this process is node I's sidecar in a job whose control plane runs elsewhere: it needs
FLASHRECOVERY_KAFKA_BOOTSTRAP, _REDIS_URL, _RDZV (the job's TCPStore server, one per job run)
and the job id of a topology already registered (nodes node-0 .. node-M-1, N ranks each); it
exits 0 when every rank of the job finished and 1 when one of its own ranks died without the
agent (the other nodes' ranks of a plain script then wait in their next collective until
torch's process-group timeout: stop them too).

Every worker gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, ROLE_RANK, MASTER_ADDR/PORT = the job's rendezvous store, TORCHELASTIC_*), so an
unmodified script's init_process_group() works, plus the FLASHRECOVERY_AGENT_* settings the agent reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .shared.settings import ConfigError, Settings

EPILOG = """\
worker output:
  echoed here, each line prefixed [rankR]: (or [standby PID]:), and kept in
  <run dir>/sidecars/<node>/rank<R>.log (standby<PID>.log for a standby). The run dir,
  <FLASHRECOVERY_RUNTIME_DIR, default .runtime>/run/<job id>, is printed at the start and
  the end; the services' logs are beside.

exit status:
  0 every rank finished; 1 the job failed (a one-line reason on stderr); 2 bad arguments;
  130 / 143 Ctrl-C / SIGTERM. Everything the launcher started is stopped in every case.

plain scripts:
  A torchrun script that does not use flashrecovery.agent runs as under torchrun with
  --standbys 0 (the default), but it cannot be recovered: when one of its ranks dies, the run
  stops every rank and exits 1 naming the rank. A standby of a plain script would fail at
  init_process_group (it has no RANK): the run stops and says to use --standbys 0. Without
  the agent there are no step reports, so a plain script's hang is not detected (torch's own
  process-group timeout still ends it).

environment:
  as torchrun: OMP_NUM_THREADS=1 for every worker when --nproc-per-node > 1 and it is unset.

other terminals:
  flashrecovery status / events / inject find a running --standalone job by themselves
  (run them in the same directory, or with the same FLASHRECOVERY_RUNTIME_DIR; with several
  jobs running, pick one with FLASHRECOVERY_JOB_ID).
"""


@dataclass(frozen=True)
class RunPlan:
    """What `flashrecovery run` was asked for, checked."""

    standalone: bool
    nproc: int
    nnodes: int
    node_rank: int
    standbys: int
    tp: int
    module: str
    script: str
    args: tuple[str, ...]
    job_id: str | None
    timeout_s: float
    echo: bool

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def ranks(self) -> list[int]:
        return list(range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc))


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run",
        help="launch a training script like torchrun, with FlashRecovery as its sidecar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "--standalone", action="store_true", help="one machine, nothing else needed: start the whole control plane here"
    )
    p.add_argument(
        "--nproc-per-node", "--nproc_per_node", dest="nproc", type=int, required=True, help="ranks on this node"
    )
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the job (not with --standalone)")
    p.add_argument(
        "--node-rank",
        "--node_rank",
        dest="node_rank",
        type=int,
        default=0,
        help="this node's index: it hosts ranks node_rank*N .. node_rank*N+N-1",
    )
    p.add_argument(
        "--standbys",
        type=int,
        default=0,
        help="--standalone: standby workers kept warm on a spare node to replace a dead "
        "rank, and one on each node for restarts in place (needs a script using "
        "flashrecovery.agent; 0 for a plain script: no standby anywhere)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="--standalone: tensor-parallel size of the registered topology (ranks with the "
        "same rank %% tp hold the same shard and can restore each other)",
    )
    p.add_argument(
        "--job-id",
        "--rdzv-id",
        "--rdzv_id",
        dest="job_id",
        default=None,
        help="job id (--standalone: default run-<random>; else FLASHRECOVERY_JOB_ID)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="--standalone: stop everything and exit 1 after this many seconds (0: never)",
    )
    p.add_argument(
        "--no-echo",
        dest="echo",
        action="store_false",
        help="do not echo worker output here (it stays in the log files)",
    )
    p.add_argument(
        "-m", "--module", action="store_true", help="the entry point is a module (python -m), not a script path"
    )
    p.add_argument("training_script", help="the script (or, with -m, the module) every rank runs")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments, passed unchanged")
    p.set_defaults(func=run)
    return p


def plan_of(args: argparse.Namespace) -> RunPlan:
    """Check the arguments; ValueError names the bad one."""
    if args.nproc < 1:
        raise ValueError("--nproc-per-node must be at least 1")
    if args.standalone and args.nnodes != 1:
        raise ValueError("--standalone runs one node: drop --nnodes (or drop --standalone)")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank must be in [0, --nnodes={args.nnodes})")
    if args.standbys < 0:
        raise ValueError("--standbys must be 0 or more")
    if not args.standalone and args.standbys:
        raise ValueError(
            "--standbys is for --standalone; in a multi-node job spare nodes run "
            "`flashrecovery sidecar` with FLASHRECOVERY_SIDECAR__ROLE=spare"
        )
    if args.tp < 1 or args.nproc % args.tp:
        raise ValueError(f"--tp {args.tp} must divide --nproc-per-node {args.nproc}")
    if args.timeout < 0:
        raise ValueError("--timeout must be 0 (never) or more")
    script = "" if args.module else str(Path(args.training_script).resolve())
    if script and not Path(script).is_file():
        raise ValueError(f"no such script: {args.training_script}")
    return RunPlan(
        standalone=args.standalone,
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        standbys=args.standbys,
        tp=args.tp,
        module=args.training_script if args.module else "",
        script=script,
        args=tuple(args.training_script_args),
        job_id=args.job_id,
        timeout_s=args.timeout,
        echo=args.echo,
    )


def standalone_layout(nproc: int, tp: int, standbys: int) -> tuple[int, int]:
    """-> (nodes, ranks per node) registered for --standalone. With standbys, one node (and
    sidecar) per tensor-parallel group: the planner restores a replaced rank only from replicas
    on other nodes than the faulty one (a node with a dead process is suspect as a source), so
    on a single registered node every replica would count as lost. Without standbys nothing is
    recovered anyway: one node, one sidecar. torchrun's view (LOCAL_RANK 0..N-1, GROUP_RANK 0)
    is the same either way."""
    return (nproc // tp, tp) if standbys else (1, nproc)


def launcher_env(environ: dict[str, str], nproc: int) -> dict[str, str]:
    """What the launcher adds to its own environment before starting anything, as torchrun does:
    OMP_NUM_THREADS=1 when several ranks share the node and it is not set (also what makes the
    numerics of a run here and under torchrun the same)."""
    if nproc > 1 and "OMP_NUM_THREADS" not in environ:
        return {"OMP_NUM_THREADS": "1"}
    return {}


def run(args: argparse.Namespace) -> int:
    from .shared.logging import configure, warn_unknown_env
    from .shared.settings import load_settings

    try:
        plan = plan_of(args)
    except ValueError as exc:
        print(f"flashrecovery run: {exc}", file=sys.stderr)
        return 2
    os.environ.update(launcher_env(dict(os.environ), plan.nproc))
    settings = load_settings()
    configure("console" if sys.stderr.isatty() else "json", level="WARNING")
    warn_unknown_env("run")
    if plan.standalone:
        return asyncio.run(_standalone(plan, settings))
    return asyncio.run(_node(plan, settings))


# ---------------------------------------------------------------- worker output
class Echo:
    """Follows the workers' log files and prints their new lines, prefixed by rank."""

    def __init__(self, root: Path, on: bool) -> None:
        self.root, self.on = root, on
        # what is there already belongs to an earlier run
        self.offsets = {p: p.stat().st_size for p in root.glob("sidecars/*/*.log")}

    def poll(self, last: bool = False) -> None:
        """Print the complete lines written since the last poll (`last`: the rest too)."""
        if not self.on:
            return
        for path in sorted(self.root.glob("sidecars/*/*.log")):
            name = path.stem
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            cut = len(data) if last else data.rfind(b"\n") + 1
            self.offsets[path] = self.offsets.get(path, 0) + cut
            tag = f"[{name}]" if name.startswith("rank") else f"[standby {name.removeprefix('standby')}]"
            for line in data[:cut].decode(errors="replace").splitlines():
                print(f"{tag}: {line}", flush=True)

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll()
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
        self.poll(last=True)


def _signals(stop: asyncio.Event, got: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (got.append(s), stop.set()))


# ---------------------------------------------------------------- --standalone
async def _standalone(plan: RunPlan, base: Settings) -> int:
    from .cluster import LocalCluster, WorkerSpec
    from .demo import _printer
    from .shared.settings import BusSettings

    job = plan.job_id or f"run-{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(
        update={
            "job_id": job,
            "bus": BusSettings(topic_namespace=job, telemetry_partitions=2, control_partitions=1, linger_ms=2),
        }
    )
    run_dir = Path(settings.runtime_dir).resolve() / "run" / job
    nodes, per_node = standalone_layout(plan.nproc, plan.tp, plan.standbys)
    cluster = LocalCluster(
        settings,
        run_dir,
        WorkerSpec(module=plan.module, script=plan.script, args=plan.args),
        nodes=nodes,
        ranks_per_node=per_node,
        tp=plan.tp,
        spares=1 if plan.standbys else 0,
        standbys=plan.standbys,
        # --standbys 0 means none anywhere (a plain script cannot have any)
        node_standbys=None if plan.standbys else 0,
        exit_with_job=True,
        one_machine=True,
        on_event=_printer(quiet=False),
    )  # incidents, plans, recovery phases
    stop, got = asyncio.Event(), []
    _signals(stop, got)
    echo = Echo(run_dir, plan.echo)
    follower = asyncio.create_task(echo.follow(stop))
    t0 = time.monotonic()
    what = plan.module and f"-m {plan.module}" or plan.script
    print(
        f"flashrecovery run: job {job}: {plan.nproc} ranks of {what}"
        f"{f' + {plan.standbys} standbys' if plan.standbys else ''}; logs in {run_dir}",
        flush=True,
    )
    code, reason = 1, ""
    try:
        starting = asyncio.create_task(cluster.start())
        interrupted = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        elif starting.exception() is not None:
            code, reason = 1, f"could not start: {starting.exception()}"
        else:
            code, reason = await _watch(cluster, plan, stop)
    finally:
        stop.set()
        await cluster.stop()
        await follower
    wall = time.monotonic() - t0
    if got:
        code = 128 + got[0]
        print(
            f"flashrecovery run: job {job} stopped by {signal.Signals(got[0]).name} ({wall:.1f} s); logs in {run_dir}",
            file=sys.stderr,
            flush=True,
        )
    elif code == 0:
        print(
            f"flashrecovery run: job {job} finished: every rank exited 0 ({wall:.1f} s); logs in {run_dir}", flush=True
        )
    else:
        print(
            f"flashrecovery run: job {job} FAILED: {reason} ({wall:.1f} s); logs in {run_dir}",
            file=sys.stderr,
            flush=True,
        )
    return code


async def _watch(cluster, plan: RunPlan, stop: asyncio.Event) -> tuple[int, str]:
    """Until the job ends: -> (exit code, reason)."""
    from .scenario import escalations
    from .shared.registry import Registry

    deadline = time.monotonic() + plan.timeout_s if plan.timeout_s else None
    sidecars = {n: p for n, p in cluster.sup.procs.items() if n.startswith("sidecar-")}
    while not stop.is_set():
        codes = {n: p.poll() for n, p in sidecars.items()}
        if any(c is not None and c > 0 for c in codes.values()):
            return 1, _failure(cluster, codes)
        killed = [n for n, c in codes.items() if c is not None and c < 0]
        if killed and not plan.standbys:
            return 1, f"{killed[0]} was killed (signal {-codes[killed[0]]}) and no standby can take its ranks"
        esc = escalations(cluster)
        if esc:
            # A sidecar ending the job for a plain rank's death says it better than the
            # escalation that the same death causes a moment earlier: give it a few seconds.
            for _ in range(40):
                if any(p.poll() is not None and p.returncode > 0 for p in sidecars.values()):
                    return 1, _failure(cluster, {n: p.poll() for n, p in sidecars.items()})
                await asyncio.sleep(0.1)
            return 1, f"escalated: {esc[0].reason[:300]}"
        if all(c is not None for c in codes.values()):
            reg = Registry.from_url(cluster.sup.stack.redis_url, cluster.settings.job_id)
            try:
                finished = await reg.job_finished()
            finally:
                await reg.close()
            if finished:
                return 0, ""
            return 1, f"the sidecars ended before every rank finished (exit codes {codes})"
        if deadline is not None and time.monotonic() > deadline:
            return 1, f"timed out after {plan.timeout_s:g} s (--timeout)"
        cluster.timeline.changed.clear()
        try:
            await asyncio.wait_for(cluster.timeline.changed.wait(), 0.25)
        except TimeoutError:
            pass
    return 1, "stopped"


def _failure(cluster, codes: dict[str, int | None]) -> str:
    """The one-line reason a sidecar gave for ending the job (its log's sidecar_ending line)."""
    for name, code in codes.items():
        if code is None or code <= 0:
            continue
        log = cluster.run_dir / f"{name}.log"
        for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
            if '"sidecar_ending"' in line:
                try:
                    return json.loads(line)["reason"]
                except (ValueError, KeyError):
                    break
        return f"{name} exited with code {code}; see {log}"
    return "a sidecar failed"


# ---------------------------------------------------------------- one node of a multi-node job
async def _node(plan: RunPlan, base: Settings) -> int:
    """This process is node `node_rank`'s sidecar; the control plane, the rendezvous store and
    the job's topology are someone else's (FLASHRECOVERY_KAFKA_BOOTSTRAP, _REDIS_URL, _RDZV,
    _JOB_ID)."""
    from .shared.settings import SidecarSettings
    from .sidecar import app as sidecar_app

    missing = [
        v
        for v, have in (
            ("FLASHRECOVERY_KAFKA_BOOTSTRAP", base.kafka_bootstrap),
            ("FLASHRECOVERY_REDIS_URL", base.redis_url),
            ("FLASHRECOVERY_RDZV", base.rdzv),
        )
        if not have
    ]
    if missing:
        raise ConfigError(f"flashrecovery run without --standalone joins a running job: set {', '.join(missing)}")
    sidecar = base.sidecar.model_dump(exclude={"worker_module", "worker_script"})
    sidecar.update(
        node_id=f"node-{plan.node_rank}",
        role="active",
        ranks=",".join(map(str, plan.ranks)),
        world_size=plan.world,
        capacity=plan.nproc,
        node_rank=plan.node_rank,
        worker_module=plan.module,
        worker_script=plan.script,
        worker_args=shlex.join(plan.args),
        exit_with_job=True,
    )
    job = plan.job_id or base.job_id
    run_dir = Path(base.runtime_dir).resolve() / "run" / job
    settings = base.model_copy(
        update={"job_id": job, "runtime_dir": str(run_dir), "sidecar": SidecarSettings(**sidecar)}
    )
    print(
        f"flashrecovery run: job {job} node-{plan.node_rank}: ranks {plan.ranks[0]}..{plan.ranks[-1]} "
        f"of {plan.world}; worker logs in {run_dir / 'sidecars' / f'node-{plan.node_rank}'}",
        flush=True,
    )
    stop = asyncio.Event()
    echo = Echo(run_dir, plan.echo)
    follower = asyncio.create_task(echo.follow(stop))
    try:
        code = await sidecar_app.main(settings)
    finally:
        stop.set()
        await follower
    print(
        f"flashrecovery run: node-{plan.node_rank} {'done' if code == 0 else 'FAILED'} (exit {code})",
        file=sys.stderr if code else sys.stdout,
        flush=True,
    )
    return code
