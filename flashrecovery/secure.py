"""Everything a secure local run needs (`flashrecovery demo --secure`, the secure e2e test): a
throwaway CA and a server certificate for 127.0.0.1/localhost, SCRAM users for the Kafka gateway,
a signing key for incidents, plans and commands, and Redis ACL users limited to the job's keys,
one per role (keys.ROLE_GRANTS): each kind of process gets its role's URL from the supervisor
(`Supervisor.redis_urls`), the run's watcher the operator's.
The embedded stack is then started with the gateway in front of the broker, and the settings
every process of the run inherits say SASL_SSL + SCRAM-SHA-512, signed, ACL-limited Redis.

Kafka principals: one per kind of process (detector, planner, executor, sidecar) and one for
the run's own watcher, each with its own password file; the supervisor gives each child its
kind's principal (`Supervisor.kafka_principals`). The gateway authenticates them, it does not
authorize: docs/security.md lists the ACLs a production broker enforces per principal."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from .shared.keys import JobKeys, Role
from .shared.scram import write_users_file
from .shared.settings import KafkaSecuritySettings, Settings
from .shared.signing import write_key_file
from .shared.stack import KafkaTls, RedisTls, Stack, StackError, start_stack

# the Kafka principal of each kind of process (Supervisor.spawn names a child "<kind>[-...]"),
# and of the process that runs the cluster (its watcher, topic set-up)
SERVICE_PRINCIPALS = ("detector", "planner", "executor", "sidecar")
WATCHER = "watcher"
# the Redis role of each kind of process (keys.ROLE_GRANTS; the supervisor gives a child its
# kind's URL), and of the process that runs the cluster (its watcher registers the job)
REDIS_ROLES: tuple[Role, ...] = ("detector", "planner", "executor", "sidecar")
OPERATOR: Role = "operator"
CERT_DAYS = "2"  # a throwaway CA: it outlives no run


@dataclass(frozen=True)
class SecureFiles:
    dir: Path
    cafile: Path
    certfile: Path
    keyfile: Path
    users_file: Path
    signing_key_file: Path

    @property
    def kafka_tls(self) -> KafkaTls:
        return KafkaTls(self.certfile, self.keyfile, self.users_file)

    def password_file(self, principal: str) -> Path:
        """The principal's password (clients read it from the file, never from the env)."""
        return self.dir / f"kafka-{principal}.password"

    def kafka_security(self, principal: str = WATCHER) -> KafkaSecuritySettings:
        return KafkaSecuritySettings(
            protocol="SASL_SSL",
            ssl_cafile=str(self.cafile),
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=principal,
            sasl_password_file=str(self.password_file(principal)),
        )

    def kafka_principals(self) -> dict[str, tuple[str, str]]:
        """Supervisor.kafka_principals: kind -> (user, password file)."""
        return {p: (p, str(self.password_file(p))) for p in SERVICE_PRINCIPALS}


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)
    except FileNotFoundError as exc:
        raise StackError("openssl not found: install the OS package (apt-get install openssl)") from exc
    except subprocess.CalledProcessError as exc:
        raise StackError(f"openssl {args[0]} failed: {exc.stderr.decode(errors='replace')[-400:]}") from exc


def write_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed, for 127.0.0.1 and localhost -> (ca, cert, key)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", CERT_DAYS,
        "-subj", "/CN=FlashRecovery throwaway CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", CERT_DAYS, "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    for name in ("ca.key", "server.key"):
        (d / name).chmod(0o600)
    return d / "ca.pem", d / "server.pem", d / "server.key"


def write_secure_files(d: Path) -> SecureFiles:
    d.mkdir(parents=True, exist_ok=True)
    ca, cert, key = write_certificates(d)
    passwords = {p: secrets.token_urlsafe(24) for p in (*SERVICE_PRINCIPALS, WATCHER)}
    users = write_users_file(d / "kafka-users.json", passwords)
    files = SecureFiles(d, ca, cert, key, users, write_key_file(d / "signing-keys.json"))
    for principal, password in passwords.items():
        f = files.password_file(principal)
        f.touch(mode=0o600)
        f.write_text(password)
    return files


def _with_user(url: str, user: str, password: str) -> str:
    u = urlsplit(url)
    query = f"?{u.query}" if u.query else ""  # rediss://: the CA to verify the server with
    return f"{u.scheme}://{user}:{password}@{u.hostname}:{u.port}{u.path}{query}"


def add_redis_users(admin_url: str, job_id: str, d: Path) -> dict[str, str]:
    """One Redis ACL user per role of this job (keys.ROLE_GRANTS: each service's and the
    watcher's, `operator`) -> role -> its URL; then the default user gets a password too, so no
    process of the run can reach Redis without one."""
    keys = JobKeys(job_id)
    urls = {}
    admin_password = secrets.token_urlsafe(24)
    r = redis.Redis.from_url(admin_url)
    try:
        for role in (*REDIS_ROLES, OPERATOR):
            user, password = f"fr-{job_id}-{role}", secrets.token_urlsafe(24)
            r.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *keys.acl_rules(role))
            urls[role] = _with_user(admin_url, user, password)
        r.execute_command("ACL", "SETUSER", "default", "resetpass", f">{admin_password}")
    finally:
        r.close()
    (d / "redis-admin-password").touch(mode=0o600)
    (d / "redis-admin-password").write_text(admin_password)
    return urls


@dataclass
class SecureRun:
    stack: Stack  # the caller stops it
    settings: Settings  # SASL_SSL as the watcher, signing on, the ACL user's Redis URL
    kafka_principals: dict[str, tuple[str, str]]  # for the supervisor: kind -> (user, password file)
    files: SecureFiles
    redis_urls: dict[str, str]  # for the supervisor: kind -> its role's Redis URL


def start_secure_stack(run_dir: Path, settings: Settings) -> SecureRun:
    """The embedded stack with the gateway (SASL/SCRAM + TLS) in front of the broker, SCRAM users
    per kind of process and a Redis ACL user per role of settings.job_id (the settings carry the
    operator's: the watcher's)."""
    files = write_secure_files(run_dir / "secrets")
    stack = start_stack(
        run_dir,
        schema_namespace=settings.bus.topic_namespace,
        kafka_tls=files.kafka_tls,
        redis_tls=RedisTls(files.certfile, files.keyfile, files.cafile),
    )
    try:
        redis_urls = add_redis_users(stack.redis_url, settings.job_id, files.dir)
    except BaseException:
        stack.stop()
        raise
    bus = settings.bus.model_copy(
        update={"security": files.kafka_security(), "signing_key_file": str(files.signing_key_file)}
    )
    secure = settings.model_copy(
        update={"kafka_bootstrap": stack.kafka_bootstrap, "redis_url": redis_urls.pop(OPERATOR), "bus": bus}
    )
    return SecureRun(stack, secure, files.kafka_principals(), files, redis_urls)
