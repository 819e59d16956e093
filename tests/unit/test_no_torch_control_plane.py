"""`pip install flashrecovery` has no torch: every control-plane entry point must import and the
CLI's torch-free commands must run with torch made unimportable (a meta-path blocker in a fresh
interpreter, so this test sees what a control-plane container sees)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import flashrecovery.shared

ENTRY_POINTS = [
    "flashrecovery.cli",
    "flashrecovery.health",
    "flashrecovery.tools",
    "flashrecovery.schemadoc",
    "flashrecovery.admin",
    "flashrecovery.deadletters",
    "flashrecovery.supervisor",
    "flashrecovery.detector.app",
    "flashrecovery.planner.app",
    "flashrecovery.executor.app",
    "flashrecovery.sidecar.app",
]
SHARED = [f"flashrecovery.shared.{m.name}" for m in pkgutil.iter_modules(flashrecovery.shared.__path__)]

BLOCKER = """
import importlib, json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named torch (blocked by the test)", name="torch")
sys.meta_path.insert(0, NoTorch())
for m in sys.argv[1].split(","):
    importlib.import_module(m)
from flashrecovery.cli import main
codes = []
for argv in json.loads(sys.argv[2]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:  # --help, --version
        codes.append(exc.code)
assert "torch" not in sys.modules, "torch got imported"
print("codes", json.dumps(codes))
"""


def _run(modules: list[str], *commands: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(modules), json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cwd,
    )


def test_the_blocker_blocks(tmp_path: Path) -> None:
    res = _run(["flashrecovery.cluster"], ["--version"], cwd=tmp_path)  # the demo cluster needs torch
    assert res.returncode != 0 and "blocked by the test" in res.stderr


def test_a_trainer_command_without_torch_says_which_extra_is_missing(tmp_path: Path) -> None:
    res = _run(["flashrecovery.cli"], ["demo", "--help"], cwd=tmp_path)
    assert res.stdout.splitlines()[-1] == "codes [2]", res.stderr[-2000:]
    assert "pip install 'flashrecovery[agent]'" in res.stderr


def test_control_plane_imports_and_runs_without_torch(tmp_path: Path) -> None:
    assert {"flashrecovery.shared.bus", "flashrecovery.shared.registry"} <= set(SHARED)
    commands = [
        ["--version"],
        ["schema", "--out", str(tmp_path / "schemas")],
        ["health", "--help"],
        ["job", "register", "--help"],
        ["node", "add-spare", "--help"],
        ["deadletters", "--help"],
    ]
    res = _run(ENTRY_POINTS + SHARED, *commands, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1] == "codes " + json.dumps([0] * len(commands)), res.stdout[-2000:]
    assert res.stdout.startswith("flashrecovery 0.") and (tmp_path / "schemas" / "asyncapi.json").is_file()
