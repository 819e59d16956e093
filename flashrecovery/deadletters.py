"""`flashrecovery deadletters`: the records of the dead-letter topic, with their reasons.

Reads the topic from its start to its current end without a consumer group and writes nothing
back: a record it cannot read is shown as unreadable, never dead-lettered again (that would
feed the topic its own output, a copy of a copy, forever)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from .shared import bus as busmod
from .shared import topics as T
from .shared.schemas import DeadLetter, SchemaError, decode_dead_letter
from .shared.settings import load_settings
from .tools import _locate


def add_deadletters_parser(sub: Any) -> None:
    p = sub.add_parser("deadletters", help="list the dead letters (source topic, offset, consumer, reason)")
    p.add_argument("--json", action="store_true", help="one JSON object a line (raw_b64 left out)")
    p.add_argument("--last", type=int, default=0, help="only the newest N (default all)")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to reach the topic's end")
    p.set_defaults(func=deadletters)


def line(letter: DeadLetter | None, record: Any) -> str:
    if letter is None:
        return f"{record.partition}:{record.offset} unreadable record ({len(record.value or b'')} bytes)"
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.at))
    return (
        f"{at} {letter.topic}[{letter.partition}]@{letter.offset} consumer={letter.consumer} "
        f"size={letter.raw_size} truncated={letter.raw_truncated} reason: {letter.reason}"
    )


def deadletters(args: argparse.Namespace) -> int:
    settings = _locate(load_settings())
    records = asyncio.run(busmod.read_to_end(settings.kafka_bootstrap, settings.bus, T.DEAD_LETTER, args.timeout))
    if args.last > 0:
        records = records[-args.last :]
    for record in records:
        try:
            letter: DeadLetter | None = decode_dead_letter(record.value)
        except SchemaError:
            letter = None
        if args.json:
            d = (
                letter.model_dump(mode="json", exclude={"raw_b64"})
                if letter
                else {"unreadable": True, "partition": record.partition, "offset": record.offset}
            )
            print(json.dumps(d))
        else:
            print(line(letter, record))
    if not args.json:
        print(f"{len(records)} dead letter(s)")
    return 0
