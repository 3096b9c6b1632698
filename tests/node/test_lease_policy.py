"""Leases enforced locally: pure, table-driven."""

from __future__ import annotations

import pytest
from agentcg.node.enforcement import (
    Ignore,
    Kill,
    LeaseView,
    Refresh,
    Update,
    expiry_on_node_clock,
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


@pytest.mark.parametrize(
    ("expires", "as_of", "asked", "expected"),
    [
        # The broker's clock 60 s behind the node's: 5 s left, counted from when it asked.
        (NOW - 55_000, NOW - 60_000 + 3, NOW, NOW + 4_997),
        # 60 s ahead: the same 5 s left, not an hour-old expiry nor one a minute away.
        (NOW + 65_000, NOW + 60_000, NOW, NOW + 5_000),
        (NOW + 5_000, NOW - 2, NOW - 2, NOW + 5_000),  # the same clocks, an instant answer
        (NOW - 1_000, NOW, NOW, NOW - 1_000),  # expired a second ago by the broker's clock
        (0, NOW, NOW, 0),  # no expiry
        (NOW + 5_000, 0, NOW + 60_000, NOW + 5_000),  # a broker that does not say: as it is
    ],
)
def test_expiry_on_node_clock(expires: int, as_of: int, asked: int, expected: int) -> None:
    assert expiry_on_node_clock(expires, as_of, asked) == expected
