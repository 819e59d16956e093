"""`flashrecovery schema`: the machine-readable event API, generated from shared/schemas.py.

One JSON Schema (draft 2020-12, as pydantic writes it) per event kind, one for the dead-letter
record, and an AsyncAPI 3.0 document of the topics (shared/topics.py) whose messages reference
those files. The committed copies in docs/schemas/ are checked against the models by a unit
test, so they cannot drift; `flashrecovery schema` rewrites them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import __version__
from .shared import schemas as S
from .shared import topics as T
from .shared.broker_schemas import models_on

DEFAULT_DIR = "docs/schemas"
REGENERATE = "flashrecovery schema --out docs/schemas"
MODELS: dict[str, type[BaseModel]] = {m.model_fields["kind"].default: m for m in (*S.EVENT_MODELS, S.DeadLetter)}
KIND_OF_TOPIC = {t.name: tuple(m.model_fields["kind"].default for m in models_on(t)) for t in T.ALL}


def json_schema(kind: str) -> dict[str, Any]:
    model = MODELS[kind]
    schema = model.model_json_schema()  # validation mode: what a reader accepts
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{kind}.json", **schema}


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for kind, model in MODELS.items():
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        messages[kind] = {
            "name": kind,
            "title": model.__name__,
            "contentType": "application/json",
            "payload": {"$ref": f"./{kind}.json"},
            **({"summary": " ".join(doc.split())} if doc else {}),
        }
    for t in T.ALL:
        short = t.name.split(".")[1]
        kinds = KIND_OF_TOPIC[t.name]
        channels[short] = {
            "address": t.name,
            "description": (
                f"Partition key: the message's `{t.key_field}` field. "
                f"Partitions: BusSettings.{t.partitions_setting}. Tests and side-by-side jobs "
                "prefix the address with BusSettings.topic_namespace."
            ),
            "messages": {k: {"$ref": f"#/components/messages/{k}"} for k in kinds},
            "bindings": {"kafka": {"topic": t.name, "bindingVersion": "0.5.0"}},
        }
        operations[f"receive-{short}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{short}"},
            "messages": [{"$ref": f"#/channels/{short}/messages/{k}"} for k in kinds],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "FlashRecovery event topics",
            "version": f"{__version__} (schema_version {S.SCHEMA_VERSION})",
            "description": "Generated from shared/schemas.py and shared/topics.py by "
            f"`{REGENERATE}`; prose in docs/events.md.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def documents() -> dict[str, str]:
    """File name -> its text, exactly as committed (sorted keys, trailing newline)."""
    out = {f"{kind}.json": json_schema(kind) for kind in MODELS} | {"asyncapi.json": asyncapi()}
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in out.items()}


def drift(folder: Path) -> list[str]:
    """Files missing, different or left over in `folder` compared with the models."""
    want = documents()
    have = {p.name for p in folder.glob("*.json")} if folder.is_dir() else set()
    bad = [n for n, text in want.items() if n not in have or (folder / n).read_text() != text]
    return sorted(bad + [n for n in have - want.keys()])


def add_schema_parser(sub: Any) -> None:
    p = sub.add_parser("schema", help="write the JSON Schemas of every event and an AsyncAPI 3 document")
    p.add_argument("--out", default=DEFAULT_DIR, help=f"folder (default {DEFAULT_DIR})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files differ from the models")
    p.set_defaults(func=schema)


def schema(args: argparse.Namespace) -> int:
    folder = Path(args.out)
    if args.check:
        bad = drift(folder)
        for name in bad:
            print(f"{folder / name}: differs from shared/schemas.py")
        if bad:
            print(f"regenerate with: {REGENERATE}")
        return 1 if bad else 0
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p for p in folder.glob("*.json") if p.name not in documents()]
    for p in stale:
        p.unlink()
    for name, text in documents().items():
        (folder / name).write_text(text)
    print(f"wrote {len(documents())} files to {folder}" + (f", removed {len(stale)} stale" if stale else ""))
    return 0
