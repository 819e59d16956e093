"""The benchmark's pure helpers: summaries, ratios, slopes, table cells."""

import math

import pytest

from flashrecovery.bench.stats import fmt, log_slope, machine_info, md_table, median_max, ratio, slope, summarize

pytestmark = pytest.mark.unit


def test_summarize_ignores_missing_values():
    s = summarize([3.0, None, 1.0, 2.0, float("nan")])
    assert s == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0}


def test_summarize_of_nothing():
    assert summarize([None]) == {"n": 0, "median": None, "min": None, "max": None}


@pytest.mark.parametrize("a,b,want", [(10.0, 2.0, 5.0), (1.0, 0.0, None), (None, 2.0, None), (1.0, None, None)])
def test_ratio(a, b, want):
    assert ratio(a, b) == want


def test_slope_of_a_line_and_degenerate_inputs():
    assert slope([1, 2, 3], [2, 4, 6]) == pytest.approx(2.0)
    assert slope([1, 1], [2, 3]) is None
    assert slope([1, 2], [5, None]) is None


def test_log_slope_is_flat_for_constant_and_per_decade_otherwise():
    assert log_slope([64, 1000, 10000], [3.0, 3.0, 3.0]) == pytest.approx(0.0)
    assert log_slope([10, 100, 1000], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "v,want", [(None, "—"), (True, "yes"), (12345, "12,345"), (1.23456, "1.23"), (2000.0, "2,000"), ("x", "x")]
)
def test_fmt(v, want):
    assert fmt(v) == want


def test_md_table_escapes_pipes():
    t = md_table(["a", "b"], [[1, "x|y"], [None, 0.5]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| — | 0.50 |"]


def test_median_max():
    assert median_max(summarize([1.0, 2.0, 4.0])) == "2.00 (4.00)"
    assert median_max(summarize([1.5])) == "1.50"
    assert median_max(None) == "—"


def test_machine_info_has_the_basics():
    m = machine_info()
    assert m["cores"] >= 1 and "python" in m and not math.isnan(m["memory_gib"] or 0.0)
