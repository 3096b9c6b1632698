"""Leases enforced locally: pure, table-driven."""

from __future__ import annotations

import pytest
from agentcg.node.enforcement import (
    Ignore,
    Kill,
    LeaseView,
    Refresh,
    Update,
    on_lease_refresh,
    on_lease_tick,
)

NOW = 1_000_000
HELD = LeaseView(epoch=3, expires_at_unix_ms=NOW + 10_000, node_id="n1")


@pytest.mark.parametrize(
    ("held", "now", "expected"),
    [
        (LeaseView(1, 0), NOW, Ignore),  # no expiry
        (HELD, NOW, Ignore),  # 10 s left, margin 2 s
        (HELD, NOW + 8_000, Refresh),  # within the margin
        (HELD, NOW + 10_000, Refresh),  # at expiry
        (HELD, NOW + 60_000, Refresh),  # long expired: still asks before stopping
    ],
)
def test_tick(held: LeaseView, now: int, expected: type) -> None:
    assert isinstance(on_lease_tick(held, now, 2_000), expected)


def fresh(**kw: object) -> LeaseView:
    base = {"epoch": 3, "expires_at_unix_ms": NOW + 10_000, "node_id": "n1"}
    return LeaseView(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answer", "now", "expected", "reason"),
    [
        (None, NOW, Ignore, "not yet expired"),
        (None, NOW + 10_000, Kill, "expired 0 ms ago without renewal (broker unreachable)"),
        (fresh(active=False, state="released"), NOW, Kill, "lease is released"),
        (fresh(active=False, state="revoked"), NOW, Kill, "lease is revoked"),
        (fresh(node_id="n2"), NOW, Kill, "placed on node n2"),
        (fresh(epoch=2), NOW, Kill, "stale epoch: broker has 2, node enforces 3"),
        (fresh(), NOW + 10_001, Kill, "expired 1 ms ago without renewal"),
        (fresh(), NOW, Ignore, "unchanged"),
        (fresh(expires_at_unix_ms=NOW + 70_000), NOW + 9_000, Update, "lease epoch 3"),
        (fresh(epoch=4), NOW, Update, "lease epoch 4"),
    ],
)
def test_refresh(answer: LeaseView | None, now: int, expected: type, reason: str) -> None:
    verdict = on_lease_refresh(HELD, answer, now, "n1")
    assert isinstance(verdict, expected)
    assert reason in verdict.reason


def test_renewed_lease_is_adopted() -> None:
    renewed = fresh(expires_at_unix_ms=NOW + 70_000)
    verdict = on_lease_refresh(HELD, renewed, NOW + 9_000, "n1")
    assert verdict == Update(renewed, f"lease epoch 3, expires at {NOW + 70_000}")
