"""The preflight ``moves`` verdict: a move that waits for a grace period is a warning naming
the remedy; a fast one is ok."""

from __future__ import annotations

import pytest
from agentcg.node.preflight import SLOW_MOVE_MS, moves_verdict


@pytest.mark.parametrize(
    ("move_ms", "status"),
    [(0.11, "ok"), (SLOW_MOVE_MS, "ok"), (SLOW_MOVE_MS + 0.01, "warn"), (9.12, "warn")],
)
def test_a_move_slower_than_the_bound_warns_with_the_remedy(move_ms: float, status: str) -> None:
    got, detail = moves_verdict(move_ms)
    assert got == status
    assert f"takes {move_ms:.2f} ms" in detail
    assert ("favordynmods" in detail) == (status == "warn")
