"""Runs the embedded stack and the service processes for `flashrecovery up` and the demo.

Each service is its own OS process (as it would be its own container); the supervisor only
starts what it owns and stops those PIDs, children first."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .shared import bus as busmod
from .shared.process import die_with_parent
from .shared.registry import Registry
from .shared.settings import ENV_PREFIX, NESTED_DELIMITER, Settings
from .shared.stack import Stack, StackError, free_port, start_stack, wait_port

SERVICES = ("detector", "planner", "executor")
# The processes that serve Prometheus metrics (shared/metrics.py) when the supervisor enables them.
METRICS_MODULES = tuple(f"flashrecovery.{m}" for m in (*SERVICES, "sidecar"))


@dataclass
class Supervisor:
    settings: Settings
    run_dir: Path
    stack: Stack | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    rdzv: str = ""
    specs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)  # name -> argv, env
    restarts: dict[str, int] = field(default_factory=dict)  # name -> times restarted
    # Give every service and sidecar process a free metrics port (`flashrecovery up`, the
    # Prometheus test); a restarted process keeps its port, so a scrape config stays valid.
    metrics: bool = False
    metrics_ports: dict[str, int] = field(default_factory=dict)  # name -> port
    # kind -> (Kafka user, password file): a child named "<kind>[-...]" authenticates as its
    # kind's principal (flashrecovery.secure); others as the settings say
    kafka_principals: dict[str, tuple[str, str]] = field(default_factory=dict)
    # kind -> Redis URL with its role's ACL user (flashrecovery.secure): a child named
    # "<kind>[-...]" gets its kind's; when set, any other child gets the address without the
    # supervisor's own credentials (the rendezvous uses no Redis)
    redis_urls: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        assert self.stack is not None
        env = {
            **os.environ,
            "FLASHRECOVERY_KAFKA_BOOTSTRAP": self.stack.kafka_bootstrap,
            "FLASHRECOVERY_REDIS_URL": self.stack.redis_url,
            "FLASHRECOVERY_JOB_ID": self.settings.job_id,
            "FLASHRECOVERY_BUS__TOPIC_NAMESPACE": self.settings.bus.topic_namespace,
            "FLASHRECOVERY_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        if self.rdzv:
            env["FLASHRECOVERY_RDZV"] = self.rdzv
        sec = self.settings.bus.security
        if sec.protocol != "PLAINTEXT":  # every child speaks to the broker as this process does
            for name, value in sec.model_dump().items():
                if value is not None:
                    env[f"{ENV_PREFIX}BUS{NESTED_DELIMITER}SECURITY{NESTED_DELIMITER}{name.upper()}"] = str(value)
        if self.settings.bus.signing_key_file:  # every service signs and checks with one keyring
            env["FLASHRECOVERY_BUS__SIGNING_KEY_FILE"] = str(Path(self.settings.bus.signing_key_file).resolve())
        # A metrics port set for this process is not every child's (they would collide): spawn()
        # gives each child its own when metrics are on.
        env.pop("FLASHRECOVERY_METRICS_PORT", None)
        env.update(extra)
        return env

    def start_stack(self, ensure: bool = True) -> Stack:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A broker started here serves this job's namespace only: it validates records at produce
        # time against the event schemas (shared/broker_schemas.py).
        self.stack = start_stack(
            self.run_dir,
            self.settings.kafka_bootstrap,
            self.settings.redis_url,
            schema_namespace=self.settings.bus.topic_namespace,
        )
        if ensure:
            asyncio.run(busmod.ensure_topics(self.stack.kafka_bootstrap, self.settings.bus))
        return self.stack

    def start_rendezvous(self) -> str:
        port = free_port()
        self.spawn("rdzv", [sys.executable, "-m", "flashrecovery.shared.rendezvous", "--port", str(port)])
        wait_port(port, 60, self.procs["rdzv"])
        self.rdzv = f"127.0.0.1:{port}"
        return self.rdzv

    def spawn(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        if self.metrics and "FLASHRECOVERY_METRICS_PORT" not in env and any(m in argv for m in METRICS_MODULES):
            env["FLASHRECOVERY_METRICS_PORT"] = str(free_port())
        if "FLASHRECOVERY_METRICS_PORT" in env:
            self.metrics_ports[name] = int(env["FLASHRECOVERY_METRICS_PORT"])
        kind = name.split("-")[0]
        principal = self.kafka_principals.get(kind)
        if principal is not None:
            sec = f"{ENV_PREFIX}BUS{NESTED_DELIMITER}SECURITY{NESTED_DELIMITER}"
            env.setdefault(f"{sec}SASL_USERNAME", principal[0])
            env.setdefault(f"{sec}SASL_PASSWORD_FILE", principal[1])
        if self.redis_urls:
            assert self.stack is not None
            env.setdefault(
                "FLASHRECOVERY_REDIS_URL", self.redis_urls.get(kind) or without_credentials(self.stack.redis_url)
            )
        log = (self.run_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            env=self.env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.procs[name] = proc
        self.specs[name] = (argv, env)
        return proc

    def revive(self, max_restarts: int) -> list[tuple[str, int, bool]]:
        """Restart every process that exited, at most `max_restarts` times each; the others keep
        running (one executor dying must leave the standby to take over, not stop everything).
        -> (name, exit code, restarted) per process found dead; one that used up its restarts
        is dropped from `procs`, so it is reported once."""
        found = []
        for name, p in list(self.procs.items()):
            code = p.poll()
            if code is None:
                continue
            argv, env = self.specs[name]
            if self.restarts.get(name, 0) >= max_restarts:
                del self.procs[name]
                found.append((name, code, False))
                continue
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self.spawn(name, argv, **env)
            found.append((name, code, True))
        return found

    def start_service(self, service: str, instance: str | None = None, **env: str) -> subprocess.Popen:
        name = instance or service
        env.setdefault("FLASHRECOVERY_INSTANCE", name)
        return self.spawn(name, [sys.executable, "-m", f"flashrecovery.{service}"], **env)

    async def wait_ready(self, names: list[str], timeout_s: float = 90.0) -> None:
        """A service is ready when its liveness key is in Redis. A name matches its service
        (`detector`: any detector instance) or one instance (`executor-1`)."""
        assert self.stack is not None
        reg = Registry.from_url(self.stack.redis_url, self.settings.job_id)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                live = set()
                for key in await reg.live_services():
                    service, _, instance = key.partition(":")
                    live |= {service, instance, f"{service}-{instance}"}  # executor:1 is executor-1
                missing = [n for n in names if n not in live]
                if not missing:
                    return
                for n in missing:
                    p = self.procs.get(n)
                    if p is not None and p.poll() is not None:
                        raise StackError(f"{n} exited with {p.returncode}; see {self.run_dir / (n + '.log')}")
                if time.monotonic() > deadline:
                    raise StackError(f"not ready after {timeout_s}s: {missing}")
                await asyncio.sleep(0.2)
        finally:
            await reg.close()

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        self._stop_together([name], timeout_s, sig)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        # Sidecars first (they own the workers), then services, then the rendezvous, then the
        # stack. Within a tier all are signalled at once and waited for together: one by one,
        # a 5-node cluster's stop took ~4 s (each sidecar reaps its workers before it exits).
        tiers: dict[int, list[str]] = {}
        for name in self.procs:
            tiers.setdefault(0 if name.startswith("sidecar") else 2 if name == "rdzv" else 1, []).append(name)
        for tier in sorted(tiers):
            self._stop_together(tiers[tier], timeout_s)
        if self.stack is not None:
            self.stack.stop()

    def _stop_together(self, names: list[str], timeout_s: float, sig: int = signal.SIGTERM) -> None:
        procs = [p for p in (self.procs.pop(n, None) for n in names) if p is not None and p.poll() is None]
        for p in procs:
            p.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout_s)


def without_credentials(url: str) -> str:
    u = urlsplit(url)
    host = u.netloc.rpartition("@")[2]
    return urlunsplit((u.scheme, host, u.path, u.query, u.fragment))


# ---------------------------------------------------------------- finding a running job
def job_address_file(runtime_dir: str | Path, job_id: str) -> Path:
    """Where a running local job (`flashrecovery run --standalone`, `demo`, `up`) leaves its
    addresses for `flashrecovery status / events / inject` in another terminal."""
    return Path(runtime_dir) / "jobs" / f"{job_id}.json"


def write_job_address(path: Path, settings: Settings, sup: Supervisor, run_dir: Path) -> None:
    assert sup.stack is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    # owner only: the Redis URL may hold a job's ACL user and password (demo --secure)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(
        json.dumps(
            {
                "job_id": settings.job_id,
                "kafka_bootstrap": sup.stack.kafka_bootstrap,
                "redis_url": sup.stack.redis_url,
                "topic_namespace": settings.bus.topic_namespace,
                "rdzv": sup.rdzv,
                "run_dir": str(run_dir),
                "pid": os.getpid(),
                # process name -> its Prometheus endpoint (empty when metrics are off)
                "metrics": {n: f"127.0.0.1:{p}" for n, p in sorted(sup.metrics_ports.items())},
            },
            indent=1,
        )
    )


def pick_job_address(found: list[dict], job_id: str | None) -> dict:
    """The running job to talk to among the address files of live jobs: `job_id` when given,
    else the only one. ValueError saying what to set otherwise."""
    if job_id is not None:
        hit = [a for a in found if a.get("job_id") == job_id]
        if hit:
            return hit[0]
        raise ValueError(
            f"no running job {job_id!r} here (running: {', '.join(sorted(a['job_id'] for a in found)) or 'none'})"
        )
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            "no running job found: start one (`flashrecovery run --standalone`, `demo`, `up`) "
            "or set FLASHRECOVERY_KAFKA_BOOTSTRAP and FLASHRECOVERY_REDIS_URL"
        )
    raise ValueError(
        f"{len(found)} jobs running ({', '.join(sorted(a['job_id'] for a in found))}): "
        "choose one with FLASHRECOVERY_JOB_ID"
    )


def live_job_addresses(runtime_dir: str | Path) -> list[dict]:
    """Address files whose writer is still running (a stale file of a killed run is skipped)."""
    out = []
    for path in sorted((Path(runtime_dir) / "jobs").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            os.kill(int(entry["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue
        out.append(entry)
    return out
