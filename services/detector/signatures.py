"""The log-signature catalog: data, not code. `signatures.json` ships with the package; an
operator's file (DetectorSettings.signatures_path) is merged over it by id, so a site can add or
override signatures without a release.

Entry fields: id, regex (case-insensitive), class (hardware | out_of_memory | communication |
software), severity (critical | error | warning), action (replace_node | restart_process | none),
and optionally header: true for a line that only opens a report (a Python "Traceback" line: the
exception line that follows decides the class).

When a line matches several entries, the most specific class wins: hardware, then out of memory,
then communication, then software; within a class the more severe entry, then catalog order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from flashrecovery.shared.schemas import FaultClass, RepairAction

LOG_CLASSES = (FaultClass.HARDWARE, FaultClass.OUT_OF_MEMORY, FaultClass.COMMUNICATION, FaultClass.SOFTWARE)
SEVERITIES = ("critical", "error", "warning")


class CatalogError(ValueError):
    """A catalog entry that cannot be used: the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Signature:
    id: str
    pattern: re.Pattern[str]
    fault_class: FaultClass
    severity: str
    action: RepairAction
    header: bool = False


class Catalog:
    def __init__(self, signatures: list[Signature]) -> None:
        order = {c: i for i, c in enumerate(LOG_CLASSES)}
        self.signatures = tuple(sorted(signatures, key=lambda s: (order[s.fault_class], SEVERITIES.index(s.severity))))
        # One pass over the alternation rejects the ordinary lines (almost all of them) cheaply.
        self._any = (
            re.compile("|".join(f"(?:{s.pattern.pattern})" for s in self.signatures), re.IGNORECASE)
            if self.signatures
            else None
        )

    def match(self, line: str) -> Signature | None:
        if self._any is None or self._any.search(line) is None:
            return None
        for sig in self.signatures:
            if sig.pattern.search(line):
                return sig
        return None

    def __len__(self) -> int:
        return len(self.signatures)


def _entry(raw: Any, where: str) -> Signature:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: an entry must be an object")
    sid = raw.get("id")
    if not isinstance(sid, str) or not sid:
        raise CatalogError(f"{where}: 'id' must be a non-empty string")
    where = f"{where} ({sid})"
    try:
        pattern = re.compile(raw["regex"], re.IGNORECASE)
    except KeyError:
        raise CatalogError(f"{where}: 'regex' is missing") from None
    except (re.error, TypeError) as exc:
        raise CatalogError(f"{where}: 'regex' does not compile: {exc}") from None
    try:
        fault_class = FaultClass(raw.get("class"))
    except ValueError:
        raise CatalogError(f"{where}: 'class' must be one of {[c.value for c in LOG_CLASSES]}") from None
    if fault_class not in LOG_CLASSES:
        raise CatalogError(f"{where}: 'class' must be one of {[c.value for c in LOG_CLASSES]}")
    severity = raw.get("severity", "error")
    if severity not in SEVERITIES:
        raise CatalogError(f"{where}: 'severity' must be one of {list(SEVERITIES)}")
    try:
        action = RepairAction(raw.get("action"))
    except ValueError:
        raise CatalogError(f"{where}: 'action' must be one of {[a.value for a in RepairAction]}") from None
    return Signature(sid, pattern, fault_class, severity, action, bool(raw.get("header", False)))


def _entries(text: str, where: str) -> list[Signature]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{where}: not JSON: {exc}") from None
    items = doc.get("signatures") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise CatalogError(f"{where}: expected a list of signatures (or {{'signatures': [...]}})")
    return [_entry(item, f"{where}[{i}]") for i, item in enumerate(items)]


def load_catalog(extra_path: str | None = None) -> Catalog:
    """The shipped catalog, with the operator's file merged over it by id."""
    builtin = resources.files(__package__).joinpath("signatures.json").read_text()
    by_id = {s.id: s for s in _entries(builtin, "signatures.json")}
    if extra_path:
        path = Path(extra_path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise CatalogError(f"{path}: cannot read: {exc}") from None
        for sig in _entries(text, str(path)):
            by_id[sig.id] = sig
    return Catalog(list(by_id.values()))
