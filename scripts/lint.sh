#!/usr/bin/env bash
# The house rules (docs/architecture.md, "Rooms and arrows"), run by `make test` before the tests:
# ruff lint + format, the import-linter contracts, mypy strict on the pure cores and shared/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/${VENV:-.venv}/bin
"$BIN/ruff" check .
"$BIN/ruff" format --check .
# import-linter and mypy read the installed layout (one import root `flashrecovery`), which
# setuptools' package-dir builds from the top-level folders: build it in a scratch folder.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
"$BIN/python" scripts/package_tree.py "$tree"
cd "$tree"
PYTHONPATH="$tree" "$BIN/lint-imports" --config "$ROOT/pyproject.toml"
CORES=(flashrecovery.shared flashrecovery.detector.core flashrecovery.detector.config flashrecovery.detector.admission
       flashrecovery.detector.classify flashrecovery.detector.correlate flashrecovery.detector.timers
       flashrecovery.detector.peers flashrecovery.planner.core flashrecovery.planner.arrays
       flashrecovery.planner.placement flashrecovery.executor.core flashrecovery.sidecar.core)
args=()
for m in "${CORES[@]}"; do args+=(-p "$m"); done
"$BIN/mypy" --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" --follow-imports=silent "${args[@]}"
