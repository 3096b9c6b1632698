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
from dataclasses import dataclass

__all__ = [
    "FLOOR_BYTES",
    "MIN_SAMPLES",
    "WINDOW",
    "Profile",
    "p95",
    "percentile",
    "profile",
    "size_budget",
]

MIN_SAMPLES = 5  # fewer observations: trust the intent
WINDOW = 64  # the most recent peaks kept per (tenant, command class)
FLOOR_BYTES = 4 << 20  # a budget below this would only pause at once


def percentile(ordered: Sequence[int], pct: int) -> int:
    """Nearest-rank ``pct``th percentile of a non-empty sorted sequence."""
    rank = max(0, -(-pct * len(ordered) // 100) - 1)  # ceil(pct/100 n) - 1
    return ordered[rank]


def p95(peaks: Sequence[int]) -> int:
    """Nearest-rank 95th percentile of a non-empty sequence."""
    return percentile(sorted(peaks), 95)


def size_budget(intent_bytes: int, peaks: Sequence[int]) -> int:
    """The memory budget to grant for ``intent_bytes`` given the class's recent peaks."""
    if len(peaks) < MIN_SAMPLES:
        return intent_bytes
    return min(intent_bytes, max(FLOOR_BYTES, p95(peaks)))


@dataclass(frozen=True, slots=True)
class Profile:
    """What was learned of one (tenant, command class): its recent peaks summed up."""

    samples: int
    learned: bool  # enough samples: budgets come from them
    p50_bytes: int
    p95_bytes: int
    max_bytes: int
    last_peak_bytes: int
    budget_bytes: int  # granted for the intent asked about; 0: none asked


def profile(peaks: Sequence[int], intent_bytes: int = 0) -> Profile:
    """Sum up a class's recent peaks (oldest first), and the budget ``intent_bytes`` gets."""
    budget = size_budget(intent_bytes, peaks) if intent_bytes > 0 else 0
    if not peaks:
        return Profile(0, False, 0, 0, 0, 0, budget)
    ordered = sorted(peaks)
    return Profile(
        samples=len(peaks),
        learned=len(peaks) >= MIN_SAMPLES,
        p50_bytes=percentile(ordered, 50),
        p95_bytes=percentile(ordered, 95),
        max_bytes=ordered[-1],
        last_peak_bytes=peaks[-1],
        budget_bytes=budget,
    )
