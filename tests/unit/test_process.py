"""shared/process.py: what a child runs between fork and exec."""

import ctypes

import pytest

from flashrecovery.shared import process

pytestmark = pytest.mark.unit


def test_die_with_parent_loads_no_library_in_the_child(monkeypatch):
    """A library load takes the dynamic loader's lock, which another thread of the threaded
    parent may have held at the fork: the child side only calls what the parent loaded."""

    def no_load(*a, **k):
        raise AssertionError("a library loaded between fork and exec")

    monkeypatch.setattr(ctypes, "CDLL", no_load)
    process.die_with_parent(0)  # 0 clears the parent-death signal: nothing changes for pytest
