"""Sizing a lease from measurements: pure functions of the observed peaks.

Declared intents are guesses (agents ask for what they fear, not what they use: peaks spread
20x across tasks, DESIGN.md). Once a (tenant, command class) has ``MIN_SAMPLES`` committed peaks
(from Release / CallFinished), a new lease is granted at their 95th percentile, never above the
declared intent and never below ``FLOOR_BYTES``. The 5% of calls that go above it hit their
budget, are paused by the node and grown by the broker from headroom (graduated enforcement),
instead of every call holding its worst case. The node-level overcommit ceiling (sum of
*intents* on a node <= capacity x ratio, in ``admission.decide_reserve``) bounds how far the
broker bets on the learned sizes.

Sessions are sized the same way (``size_session_max``): a session with a class is declared at
the 95th percentile (the broker's ``--session-percentile``) of the most that recent sessions of
that class held at once (all their budgets together), never above what it declared. A framework
rarely knows what a whole agent session will need (peaks spread 20x across tasks); it knows its
sandbox's limit. Declared at that limit, a node holds few sessions (admission keeps room for
every declared maximum); declared at what such sessions used, it holds as many as fit, and those
that go past it wait for room to grow (``admission.decide_growth``), as a call past its learned
budget does.
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
    "size_session_max",
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


def size_session_max(declared_bytes: int, peaks: Sequence[int], pct: int = 95) -> int:
    """The maximum to declare for a new session of a class whose recent sessions held at most
    ``peaks`` (oldest first): their ``pct``th percentile; ``declared_bytes`` is what it declared
    itself (0: nothing). Until the class has ``MIN_SAMPLES`` sessions behind it, what was
    declared (0 stays undeclared)."""
    if len(peaks) < MIN_SAMPLES:
        return declared_bytes
    learned = max(FLOOR_BYTES, percentile(sorted(peaks), pct))
    return min(declared_bytes, learned) if declared_bytes > 0 else learned


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
