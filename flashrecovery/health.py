"""`flashrecovery health`: the probe behind container liveness/readiness checks.

A service is healthy while its liveness key `alive:<service>:<instance>` (keys.liveness, a TTL
key every service renews every few seconds) is in Redis. Exit codes: 0 healthy, 1 not (or Redis
unreachable), 2 configuration error (no Redis address, bad FLASHRECOVERY_* value).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .shared.registry import Registry
from .shared.settings import ConfigError, load_settings

SERVICES = ("detector", "planner", "executor")  # what a control plane needs (sidecars are per node)
TIMEOUT_S = 3.0  # a probe must answer within the kubelet's timeoutSeconds


def add_health_parser(sub: Any) -> None:
    p = sub.add_parser("health", help="exit 0 if the service(s) are live in Redis, 1 if not, 2 on bad config")
    p.add_argument(
        "--service",
        choices=(*SERVICES, "sidecar"),
        help="one service (default: detector, planner and executor, any instance each)",
    )
    p.add_argument("--instance", help="one instance of --service (default: FLASHRECOVERY_INSTANCE when set, else any)")
    p.set_defaults(func=health)


def verdict(live: list[str], services: tuple[str, ...], instance: str | None) -> dict[str, bool]:
    """Pure: which of `services` have a live key among `live` (`service:instance` strings)."""
    seen = {tuple(k.split(":", 1)) for k in live if ":" in k}
    return {s: any(svc == s and (instance is None or inst == instance) for svc, inst in seen) for s in services}


async def _live(redis_url: str, job_id: str) -> list[str]:
    reg = Registry.from_url(redis_url, job_id)
    try:
        return await asyncio.wait_for(reg.live_services(), TIMEOUT_S)
    finally:
        await reg.close()


def health(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not settings.redis_url:
        raise ConfigError("health: FLASHRECOVERY_REDIS_URL is not set (the Redis the services use)")
    if args.instance is not None and args.service is None:
        raise ConfigError("health: --instance needs --service")
    instance = args.instance
    if instance is None and args.service and "instance" in settings.model_fields_set:
        instance = settings.instance  # a pod probing itself: its own instance
    services = (args.service,) if args.service else SERVICES
    try:
        live = asyncio.run(_live(settings.redis_url, settings.job_id))
    except Exception as exc:  # noqa: BLE001 - unreachable Redis, timeout: not healthy
        print(f"unhealthy: Redis {settings.redis_url} unreachable: {exc!r}"[:300], file=sys.stderr)
        return 1
    result = verdict(live, services, instance)
    for s, ok in result.items():
        print(f"{s}{':' + instance if instance else ''} {'live' if ok else 'NOT LIVE'}")
    return 0 if all(result.values()) else 1
