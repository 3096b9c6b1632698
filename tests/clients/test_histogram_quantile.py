"""The quantile `agentcg bench admission` reads off the broker's admission histogram."""

from __future__ import annotations

import math

import pytest
from agentcg.clients.bench_admission import histogram_quantile

INF = float("inf")


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # 100 observations, all in the first bucket: linear from 0.
        (0.5, [(1.0, 100), (2.0, 100), (INF, 100)], 0.5),
        (0.99, [(1.0, 100), (2.0, 100), (INF, 100)], 0.99),
        # 90 up to 1, 10 more up to 3: the 99th falls in (1, 3], 9 of its 10 in.
        (0.99, [(1.0, 90), (3.0, 100), (INF, 100)], 1.0 + 2.0 * 9 / 10),
        # The rank lands exactly on a bucket's cumulative count: that bucket's bound.
        (0.9, [(1.0, 90), (3.0, 100), (INF, 100)], 1.0),
        # Past the last finite bound: that bound (nothing finer is known).
        (0.99, [(1.0, 50), (2.0, 90), (INF, 100)], 2.0),
        # Unsorted input, as a scrape's dict may give it.
        (0.99, [(INF, 100), (3.0, 100), (1.0, 90)], 2.8),
    ],
)
def test_histogram_quantile(q: float, buckets: list[tuple[float, float]], expected: float) -> None:
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


def test_histogram_quantile_of_nothing_is_nan() -> None:
    assert math.isnan(histogram_quantile(0.99, []))
    assert math.isnan(histogram_quantile(0.99, [(1.0, 0), (INF, 0)]))
