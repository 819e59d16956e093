"""The one way a service process starts, whether as `python -m flashrecovery.<service>` or
`flashrecovery <service>`: settings from the environment, logging configured, the service's
async `main(settings)` run, configuration errors printed with exit code 2."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .logging import configure, warn_unknown_env
from .settings import ConfigError, Settings, load_settings

ServiceMain = Callable[[Settings], Coroutine[Any, Any, Any]]


def run_service(main: ServiceMain) -> int:
    """Exit code of the service: its own when it returns an int, else 0; 2 for bad
    configuration; 130 on Ctrl-C."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure(settings.log_format)
    warn_unknown_env(main.__module__.removesuffix(".app").rpartition(".")[2])
    try:
        code: object = asyncio.run(main(settings))
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0
