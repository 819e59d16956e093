"""Authentication tags (shared/signing.py): what verifies, what is refused and why, rotation,
and bad key files as configuration errors."""

from __future__ import annotations

import json

import pytest

from flashrecovery.shared.settings import ConfigError, load_settings
from flashrecovery.shared.signing import HEADER_KID, HEADER_TAG, Keyring, KeyringError, load_keyring, write_key_file

pytestmark = pytest.mark.unit

K1, K2 = bytes(range(32)), bytes(range(1, 33))
TOPIC = "flashrecovery.commands.v1"
VALUE = b'{"kind":"executor_command","action":"pause"}'


def test_a_tag_verifies_and_any_change_is_refused() -> None:
    ring = Keyring("k1", {"k1": K1})
    headers = ring.headers(TOPIC, VALUE)
    assert ring.refusal(TOPIC, VALUE, headers) is None
    assert "forged" in (ring.refusal(TOPIC, VALUE + b" ", headers) or "")
    # the same bytes and tag moved onto another topic
    assert "forged" in (ring.refusal("flashrecovery.plans.v1", VALUE, headers) or "")
    assert "unsigned" in (ring.refusal(TOPIC, VALUE, None) or "")
    assert "unsigned" in (ring.refusal(TOPIC, VALUE, [(HEADER_KID, b"k1")]) or "")


def test_a_tag_made_with_another_key_is_refused() -> None:
    mine, theirs = Keyring("k1", {"k1": K1}), Keyring("k1", {"k1": K2})
    assert "forged" in (mine.refusal(TOPIC, VALUE, theirs.headers(TOPIC, VALUE)) or "")
    assert "unknown key id 'x'" in (mine.refusal(TOPIC, VALUE, [(HEADER_KID, b"x"), (HEADER_TAG, b"00")]) or "")


def test_rotation_accepts_both_keys_while_both_are_listed() -> None:
    old = Keyring("k1", {"k1": K1})
    during = Keyring("k2", {"k1": K1, "k2": K2})  # readers first, then the new key signs
    after = Keyring("k2", {"k2": K2})
    assert during.refusal(TOPIC, VALUE, old.headers(TOPIC, VALUE)) is None
    assert old.refusal(TOPIC, VALUE, during.headers(TOPIC, VALUE)) is not None
    assert after.refusal(TOPIC, VALUE, during.headers(TOPIC, VALUE)) is None
    assert "unknown key id 'k1'" in (after.refusal(TOPIC, VALUE, old.headers(TOPIC, VALUE)) or "")


def test_key_files(tmp_path) -> None:
    path = write_key_file(tmp_path / "keys.json", ("k1", "k2"))
    ring = load_keyring(path)
    assert ring.active == "k2" and set(ring.keys) == {"k1", "k2"}
    assert path.stat().st_mode & 0o077 == 0
    (tmp_path / "short.json").write_text(json.dumps({"active": "a", "keys": {"a": "00ff"}}))
    with pytest.raises(KeyringError, match="shorter than 32 bytes"):
        load_keyring(tmp_path / "short.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(KeyringError, match="not a usable key file"):
        load_keyring(tmp_path / "bad.json")
    with pytest.raises(KeyringError, match="active key 'b'"):
        Keyring("b", {"a": K1})


def test_a_bad_key_file_is_a_configuration_error_naming_the_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLASHRECOVERY_BUS__SIGNING_KEY_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="FLASHRECOVERY_BUS__SIGNING_KEY_FILE"):
        load_settings()
