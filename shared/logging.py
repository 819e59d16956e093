"""structlog set-up: configure once; console on a terminal, JSON anywhere else."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog

from .settings import unknown_env


def configure(fmt: str = "auto", level: str = "INFO") -> None:
    json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(service: str, **context: object) -> structlog.stdlib.BoundLogger:
    log: structlog.stdlib.BoundLogger = structlog.get_logger().bind(service=service, **context)
    return log


def warn_unknown_env(service: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line naming the FLASHRECOVERY_ variables no setting reads (an operator's
    typo would otherwise be ignored without a word). Start-up only; never fails."""
    unknown = unknown_env(os.environ if environ is None else environ)
    if unknown:
        get_logger(service).warning(
            "unknown_settings",
            names=unknown,
            reason="no setting reads these variables: ignored (docs/configuration.md lists every one)",
        )
    return unknown
