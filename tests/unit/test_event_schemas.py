"""The published event API cannot drift from the models: the committed JSON Schemas and
AsyncAPI document equal what `flashrecovery schema` generates, and docs/events.md names every
field of every event."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel

from flashrecovery import schemadoc
from flashrecovery.shared import schemas as S
from flashrecovery.shared import topics as T

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schema_files_match_the_models() -> None:
    bad = schemadoc.drift(ROOT / schemadoc.DEFAULT_DIR)
    assert not bad, f"docs/schemas differs from shared/schemas.py in {bad}: regenerate with `{schemadoc.REGENERATE}`"


def test_drift_is_reported_for_a_changed_missing_or_extra_file(tmp_path: Path) -> None:
    for name, text in schemadoc.documents().items():
        (tmp_path / name).write_text(text)
    assert schemadoc.drift(tmp_path) == []
    (tmp_path / "log_event.json").write_text("{}\n")
    (tmp_path / "worker_exit.json").unlink()
    (tmp_path / "old_kind.json").write_text("{}\n")
    assert schemadoc.drift(tmp_path) == ["log_event.json", "old_kind.json", "worker_exit.json"]


def test_asyncapi_names_every_topic_and_every_kind_once() -> None:
    doc = schemadoc.asyncapi()
    assert doc["asyncapi"].startswith("3.")
    assert sorted(c["address"] for c in doc["channels"].values()) == sorted(t.name for t in T.ALL)
    kinds = [k for c in doc["channels"].values() for k in c["messages"]]
    assert sorted(kinds) == sorted([*S.EVENT_KINDS, "dead_letter"])
    for kind, msg in doc["components"]["messages"].items():
        assert (ROOT / schemadoc.DEFAULT_DIR / msg["payload"]["$ref"]).is_file(), kind


def test_a_real_event_carries_only_fields_its_schema_names() -> None:
    ev = S.RecoveryCompleted(
        job_id="j", generation=1, producer="executor-0", incident_id="i", plan_id="p", outcome="done"
    )
    props = json.loads((ROOT / schemadoc.DEFAULT_DIR / "recovery_completed.json").read_text())["properties"]
    assert set(ev.model_dump(mode="json")) == set(props)


def _fields(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every field name of a model and of the models nested in it (ranks[], evidence[] ...)."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for f in model.model_fields.values():
        for t in re.findall(r"\w+", str(f.annotation)):
            nested = getattr(S, t, None)
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                names |= _fields(nested, seen)
    return names


def test_events_md_documents_every_field_of_every_event() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    missing = {
        kind: sorted(f for f in _fields(model) if not re.search(rf"`{f}(\[\])?`", _section(text, kind)))
        for kind, model in schemadoc.MODELS.items()
    }
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"fields sent but not documented in docs/events.md: {missing}"


def _section(text: str, kind: str) -> str:
    """The envelope table, plus the kind's own entry: its bullet up to the next bullet of the
    kinds list (dead letters: their section)."""
    envelope = text.split("## Envelope", 1)[1].split("## Topics", 1)[0]
    if kind == "dead_letter":
        return envelope + text.split("## Dead-letter records", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"^- `{kind}`:(.*?)(?=^- `|^## )", text, re.S | re.M)
    assert m, f"docs/events.md has no entry for `{kind}`"
    return envelope + m.group(1)
