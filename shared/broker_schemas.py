"""JSON Schemas of each topic's record values, in the layout the embedded broker (tansu
`--schema-registry file://DIR`) validates against at produce time: one `<topic>.json` per topic,
`{"type": "object", "properties": {"value": <schema of the value>}}`. Generated from the
pydantic models of shared/schemas.py, so the broker and the services agree by construction:
malformed records are refused at the broker; what still gets through (a valid shape with values
a consumer refuses) is dead-lettered by the services as before.

Forward compatible like the readers: unknown fields are allowed (new fields come with defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter

from . import schemas as S
from . import topics as T


def models_on(topic: T.Topic) -> list[type[BaseModel]]:
    """The event models whose records travel on `topic` (topics.TOPIC_OF_KIND)."""
    if topic is T.DEAD_LETTER:
        return [S.DeadLetter]
    return [m for m in S.EVENT_MODELS if T.TOPIC_OF_KIND[m.model_fields["kind"].default] is topic]


def value_schema(topic: T.Topic) -> dict[str, Any]:
    models = models_on(topic)
    if len(models) == 1:
        return models[0].model_json_schema()
    # The union is built at run time from the topic's models: a type the checker cannot see.
    union: Any = Annotated[Union[tuple(models)], Field(discriminator="kind")]
    schema: dict[str, Any] = TypeAdapter(union).json_schema()
    return schema


def write_broker_schemas(dest: Path, namespace: str = "") -> list[Path]:
    """One file per topic (names as the services use them under `namespace`)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for topic in T.ALL:
        path = dest / f"{T.with_namespace(topic.name, namespace)}.json"
        path.write_text(json.dumps({"type": "object", "properties": {"value": value_schema(topic)}}, indent=1))
        out.append(path)
    return out
