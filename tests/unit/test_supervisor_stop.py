"""Supervisor.stop_all: sidecars first (they own the workers), then the services, then the
rendezvous; the members of a tier stopped together, not one after another."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flashrecovery.shared.settings import Settings
from flashrecovery.supervisor import Supervisor

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

CHILD = textwrap.dedent(
    """
    import signal, sys, time
    log, name, linger = sys.argv[1], sys.argv[2], float(sys.argv[3])
    def term(*_):
        open(log, "a").write(f"{name} term {time.monotonic()}\\n")
        time.sleep(linger)  # a sidecar reaping its workers
        open(log, "a").write(f"{name} end {time.monotonic()}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    open(log, "a").write(f"{name} up\\n")
    while True:
        time.sleep(0.05)
    """
)


def test_tiers_stop_in_order_and_a_tier_together(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sup = Supervisor(Settings(), tmp_path)
    names = {"sidecar-node-0": 0.6, "sidecar-node-1": 0.6, "detector": 0.0, "executor-0": 0.0, "rdzv": 0.0}
    for name, linger in names.items():
        sup.procs[name] = subprocess.Popen([sys.executable, "-c", CHILD, str(log), name, str(linger)])
    deadline = time.monotonic() + 30
    while (log.read_text().count(" up") if log.exists() else 0) < len(names) and time.monotonic() < deadline:
        time.sleep(0.05)  # every child has its SIGTERM handler in place
    sup.stop_all()
    at = {}
    for line in log.read_text().splitlines():
        name, what, *t = line.split()
        if t:
            at[(name, what)] = float(t[0])
    assert len(at) == 2 * len(names), at
    sidecars_end = max(at[(n, "end")] for n in names if n.startswith("sidecar"))
    # both sidecars were signalled before either had finished lingering: stopped together
    assert max(at[(n, "term")] for n in names if n.startswith("sidecar")) < min(
        at[(n, "end")] for n in names if n.startswith("sidecar")
    )
    assert min(at[(n, "term")] for n in ("detector", "executor-0")) >= sidecars_end
    assert at[("rdzv", "term")] >= max(at[(n, "end")] for n in ("detector", "executor-0"))
    assert sup.procs == {}
