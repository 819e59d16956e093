"""Authentication tags on the messages that make something happen (topics.SIGNED): commands
(-> sidecars kill processes and move training state), plans (-> the executor drives), incidents
(-> the planner plans), worker events and heartbeats (-> the detector raises incidents), acks
(-> a recovery moves on). Anyone who can write to those topics could otherwise order that.

The tag is HMAC-SHA256 over the topic name and the record's value bytes exactly as produced, so
there is nothing to canonicalise and a tag cannot be moved to another topic. It travels in two
record headers (`fr-kid`: which key, `fr-tag`: the hex tag), which leaves the event schemas and
their readers unchanged. A keyring holds one active key (signs) and any number of accepted keys
(verify): a rotation publishes the new key to every reader first, then makes it active, then
drops the old one (docs/security.md).

Replays of a genuine tagged message are refused by what it carries, not by the tag: a command of
an older generation or a deposed executor's fence token is ignored by the sidecars' gate, a
reused command id is acknowledged again and not acted on twice, an incident or plan already
recorded is not planned or driven again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HEADER_KID = "fr-kid"
HEADER_TAG = "fr-tag"
MIN_KEY_BYTES = 32


class KeyringError(ValueError):
    """A key file that cannot be used: the reason names the file and the problem."""


def _tag(key: bytes, topic: str, value: bytes) -> str:
    return hmac.new(key, topic.encode() + b"\n" + value, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Keyring:
    active: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise KeyringError(f"active key {self.active!r} is not among the keys {sorted(self.keys)}")
        short = [k for k, v in self.keys.items() if len(v) < MIN_KEY_BYTES]
        if short:
            raise KeyringError(f"keys {short} are shorter than {MIN_KEY_BYTES} bytes")

    def headers(self, topic: str, value: bytes) -> list[tuple[str, bytes]]:
        """The record headers that authenticate `value` on `topic` with the active key."""
        return [(HEADER_KID, self.active.encode()), (HEADER_TAG, _tag(self.keys[self.active], topic, value).encode())]

    def refusal(self, topic: str, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None) -> str | None:
        """Why a record must not be acted on, or None when its tag is valid under an accepted key."""
        h: dict[str, bytes] = {}
        for name, v in headers or ():
            h.setdefault(name, v)
        kid, tag = h.get(HEADER_KID), h.get(HEADER_TAG)
        if kid is None or tag is None:
            return "unsigned: no authentication tag"
        key = self.keys.get(kid.decode(errors="replace"))
        if key is None:
            return f"signed with unknown key id {kid[:64].decode(errors='replace')!r}"
        if not hmac.compare_digest(tag, _tag(key, topic, value or b"").encode()):
            return f"forged: the tag does not match key {kid.decode(errors='replace')!r}"
        return None


def load_keyring(path: str | Path) -> Keyring:
    """A key file: JSON {"active": "<key id>", "keys": {"<key id>": "<hex, >= 32 bytes>", ...}},
    e.g. a mounted Kubernetes Secret. Every key listed is accepted; only the active one signs."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        keys = {str(k): bytes.fromhex(v) for k, v in doc["keys"].items()}
        return Keyring(active=str(doc["active"]), keys=keys)
    except KeyringError as exc:
        raise KeyringError(f"{p}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyringError(
            f'{p}: not a usable key file ({exc!r}); expected {{"active": ID, "keys": {{ID: HEX, ...}}}}'
        ) from None


def write_key_file(path: str | Path, key_ids: Sequence[str] = ("k1",), active: str | None = None) -> Path:
    """A new key file with fresh random keys (the embedded stack's, or an operator's first)."""
    import secrets

    p = Path(path)
    doc = {"active": active or key_ids[-1], "keys": {k: secrets.token_hex(32) for k in key_ids}}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch(mode=0o600)
    p.write_text(json.dumps(doc, indent=1))
    return p
