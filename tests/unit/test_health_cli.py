"""`flashrecovery health`: the verdict from liveness keys, and the documented exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

from flashrecovery.health import verdict

LIVE = ["detector:detector-a", "executor:0", "executor:1", "sidecar:node-0"]


def test_every_control_plane_service_needs_one_live_instance() -> None:
    assert verdict(LIVE, ("detector", "planner", "executor"), None) == {
        "detector": True,
        "planner": False,
        "executor": True,
    }


def test_an_instance_must_match_exactly() -> None:
    assert verdict(LIVE, ("executor",), "1") == {"executor": True}
    assert verdict(LIVE, ("executor",), "2") == {"executor": False}
    # A prefix of another service's name is not that service.
    assert verdict(["detectorx:0"], ("detector",), None) == {"detector": False}


def _health(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLASHRECOVERY_")}
    return subprocess.run(
        [sys.executable, "-m", "flashrecovery", "health", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_exit_2_without_a_redis_address_and_1_when_redis_is_unreachable() -> None:
    assert _health().returncode == 2
    bad = _health("--service", "planner", FLASHRECOVERY_REDIS_URL="redis://127.0.0.1:1")
    assert bad.returncode == 1 and "unreachable" in bad.stderr
    assert _health("--instance", "0", FLASHRECOVERY_REDIS_URL="redis://127.0.0.1:1").returncode == 2
