"""The detector's incident clock (services/detector/app.ReceiveClock): exact intervals while
the wall clock only drifts, the wall clock again after it stepped."""

from __future__ import annotations

import pytest

from flashrecovery.detector.app import ReceiveClock


class FakeClocks:
    def __init__(self) -> None:
        self.wall, self.mono = 1_000.0, 5.0

    def advance(self, s: float, wall_extra: float = 0.0) -> None:
        self.mono += s
        self.wall += s + wall_extra


def test_small_drift_keeps_the_monotonic_intervals_and_a_step_is_followed() -> None:
    c = FakeClocks()
    clock = ReceiveClock(wall=lambda: c.wall, mono=lambda: c.mono)
    assert clock() == pytest.approx(1_000.0)
    c.advance(10.0, wall_extra=0.05)  # NTP slewing: intervals stay monotonic-exact
    assert clock() == pytest.approx(1_010.0)
    c.advance(2.0, wall_extra=17.6)  # a wall-clock step: other processes now stamp +17.6 s
    assert clock() == pytest.approx(c.wall)
    c.advance(1.0)
    assert clock() == pytest.approx(c.wall)
