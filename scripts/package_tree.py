"""Copy the project's Python sources into the layout they have once installed
(`flashrecovery/`, `flashrecovery/shared/`, `flashrecovery/detector/`, ...), as pyproject's
package-dir maps them, so tools that walk packages on disk (import-linter, mypy) see the one
import root `flashrecovery` that users import.

    python scripts/package_tree.py DEST
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(dest: Path) -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    if dest.exists():
        shutil.rmtree(dest)
    for package in cfg["packages"]:
        src = ROOT / cfg["package-dir"][package]
        out = dest.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):  # subpackages are listed in `packages` themselves
            shutil.copy2(f, out / f.name)
    (dest / "flashrecovery" / "py.typed").touch()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
