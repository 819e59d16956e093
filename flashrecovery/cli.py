"""The `flashrecovery` command line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .shared.entry import run_service
from .shared.logging import configure, get_logger, warn_unknown_env
from .shared.settings import ConfigError, load_settings


def _run_service(name: str) -> int:
    return run_service(importlib.import_module(f"flashrecovery.{name}.app").main)


def cmd_up(args: argparse.Namespace) -> int:
    """Start the embedded stack (unless addresses are configured) and every service; stop all
    of it on Ctrl-C / SIGTERM."""
    from .supervisor import SERVICES, Supervisor, job_address_file, write_job_address

    settings = load_settings()
    configure(settings.log_format)
    warn_unknown_env("up")
    log = get_logger("up", job_id=settings.job_id)
    sup = Supervisor(settings, Path(settings.runtime_dir) / f"up-{int(time.time())}", metrics=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stack = sup.start_stack()
        log.info(
            "stack_ready", kafka=stack.kafka_bootstrap, redis=stack.redis_url, embedded=[p.name for p in stack.owned]
        )
        names = []
        for service in SERVICES:
            for i in range(args.executors if service == "executor" else 1):
                if service == "executor":
                    sup.start_service(service, f"executor-{i}", FLASHRECOVERY_INSTANCE=str(i))
                    names.append(f"executor-{i}")
                else:
                    sup.start_service(service)  # ready when any instance of it is live
                    names.append(service)
        asyncio.run(sup.wait_ready(names))
        log.info("services_ready", services=names, logs=str(sup.run_dir))
        address = job_address_file(settings.runtime_dir, settings.job_id)
        write_job_address(address, settings, sup, sup.run_dir)  # for status / events / inject
        print(
            f"flashrecovery up: {', '.join(names)} ready; kafka {stack.kafka_bootstrap}, "
            f"redis {stack.redis_url}. Ctrl-C stops everything.",
            flush=True,
        )
        if args.exit_when_ready:
            return 0
        # A service that dies is restarted (bounded); the others keep running meanwhile: when
        # the leading executor dies, the standby takes over, and the restarted one stands by.
        while not stop.wait(0.5):
            for name, code, restarted in sup.revive(args.max_restarts):
                if restarted:
                    log.warning(
                        "service_restarted",
                        process=name,
                        exit_code=code,
                        restarts=sup.restarts[name],
                        max_restarts=args.max_restarts,
                    )
                else:
                    log.error(
                        "service_given_up",
                        process=name,
                        exit_code=code,
                        restarts=sup.restarts.get(name, 0),
                        reason="restarted max_restarts times: left stopped, the rest keep running",
                    )
        return 0
    finally:
        sup.stop_all()
        job_address_file(settings.runtime_dir, settings.job_id).unlink(missing_ok=True)
        log.info("stopped", nothing_left_running=all(p.poll() is not None for p in sup.procs.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flashrecovery",
        description=__doc__,
        epilog="exit codes: 0 ok, 1 failed / unhealthy, 2 bad configuration or "
        "usage, 130/143 interrupted (docs/operations.md)",
    )
    ap.add_argument("--version", action="version", version=f"flashrecovery {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run the services (embedded broker + Redis unless configured)")
    up.add_argument("--executors", type=int, default=2, help="executor instances (one leads)")
    up.add_argument("--exit-when-ready", action="store_true", help="start, check health, stop")
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts of a service that exits before `up` gives up on it (the rest keep running)",
    )
    for service in ("detector", "planner", "executor", "sidecar"):
        sub.add_parser(service, help=f"run one {service} (addresses from FLASHRECOVERY_*)")
    # Tools are imported only when asked for: a service start must not pay for torch.
    argv = sys.argv[1:] if argv is None else argv
    tools = {
        "run": "flashrecovery.launch",
        "demo": "flashrecovery.demo",
        "status": "flashrecovery.tools",
        "events": "flashrecovery.tools",
        "inject": "flashrecovery.tools",
        "bench": "flashrecovery.bench.cli",
        "health": "flashrecovery.health",
        "schema": "flashrecovery.schemadoc",
        "job": "flashrecovery.admin",
        "node": "flashrecovery.admin",
        "deadletters": "flashrecovery.deadletters",
    }
    for name, module in tools.items():
        if argv and argv[0] == name:
            try:
                loaded = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != "torch":
                    raise
                # `pip install flashrecovery` is the control plane only: say what is missing.
                print(f"flashrecovery {name} needs torch: pip install 'flashrecovery[agent]'", file=sys.stderr)
                return 2
            getattr(loaded, f"add_{name}_parser")(sub)
        else:
            sub.add_parser(name, help=f"(see flashrecovery {name} --help)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            return cmd_up(args)
        if args.cmd in ("detector", "planner", "executor", "sidecar"):
            return _run_service(args.cmd)
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
