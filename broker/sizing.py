"""Sizing a lease from measurements: pure functions of the observed peaks.

Declared intents are guesses (agents ask for what they fear, not what they use: peaks spread
20x across tasks, DESIGN.md). Once a (tenant, command class) has ``MIN_SAMPLES`` committed peaks
(from Release / CallFinished), a new lease is granted at their 95th percentile, never above the
declared intent and never below ``FLOOR_BYTES``. The 5% of calls that go above it hit their
budget, are paused by the node and grown by the broker from headroom (graduated enforcement),
instead of every call holding its worst case. The node-level overcommit ceiling (sum of
*intents* on a node <= capacity x ratio, in ``admission.decide_reserve``) bounds how far the
broker bets on the learned sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FLOOR_BYTES", "MIN_SAMPLES", "WINDOW", "p95", "size_budget"]

MIN_SAMPLES = 5  # fewer observations: trust the intent
WINDOW = 64  # the most recent peaks kept per (tenant, command class)
FLOOR_BYTES = 4 << 20  # a budget below this would only pause at once


def p95(peaks: Sequence[int]) -> int:
    """Nearest-rank 95th percentile of a non-empty sequence."""
    ordered = sorted(peaks)
    rank = max(0, -(-95 * len(ordered) // 100) - 1)  # ceil(0.95 n) - 1
    return ordered[rank]


def size_budget(intent_bytes: int, peaks: Sequence[int]) -> int:
    """The memory budget to grant for ``intent_bytes`` given the class's recent peaks."""
    if len(peaks) < MIN_SAMPLES:
        return intent_bytes
    return min(intent_bytes, max(FLOOR_BYTES, p95(peaks)))
