"""The preflight ``moves`` and ``thresholds`` verdicts: a move or a usage-threshold registration
that waited for an RCU grace period is a warning naming the remedies and the host's setting; a
fast one is ok. And the host's RCU knobs read from a fixture tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.node.preflight import (
    SLOW_MOVE_MS,
    RcuSettings,
    moves_verdict,
    rcu_settings,
    thresholds_verdict,
)

NORMAL = RcuSettings(expedited=0, normal=0)


@pytest.mark.parametrize(
    ("move_ms", "status"),
    [(0.11, "ok"), (SLOW_MOVE_MS, "ok"), (SLOW_MOVE_MS + 0.01, "warn"), (9.12, "warn")],
)
def test_a_move_slower_than_the_bound_warns_with_the_remedies(move_ms: float, status: str) -> None:
    got, detail = moves_verdict(move_ms, NORMAL)
    assert got == status
    assert f"takes {move_ms:.2f} ms" in detail
    warned = status == "warn"
    assert ("favordynmods" in detail) == warned
    assert ("/sys/kernel/rcu_expedited" in detail) == warned
    assert ("rcu_expedited is 0" in detail) == warned


@pytest.mark.parametrize(
    ("register_ms", "status"),
    [(0.13, "ok"), (SLOW_MOVE_MS, "ok"), (SLOW_MOVE_MS + 0.01, "warn"), (7.31, "warn")],
)
def test_a_slow_threshold_registration_warns_naming_expedited_grace_periods(
    register_ms: float, status: str
) -> None:
    got, detail = thresholds_verdict(register_ms, NORMAL)
    assert got == status
    assert f"takes {register_ms:.2f} ms" in detail
    warned = status == "warn"
    assert ("rcupdate.rcu_expedited=1" in detail) == warned
    assert "favordynmods" not in detail  # it does not make registrations faster


def test_no_usage_thresholds_is_ok() -> None:
    status, detail = thresholds_verdict(None, NORMAL)
    assert status == "ok"
    assert "no usage thresholds" in detail


@pytest.mark.parametrize(
    ("files", "settings", "text"),
    [
        ({"rcu_expedited": "0\n", "rcu_normal": "0\n"}, RcuSettings(0, 0), "rcu_expedited is 0"),
        ({"rcu_expedited": "1\n", "rcu_normal": "0\n"}, RcuSettings(1, 0), "rcu_expedited is 1"),
        (
            {"rcu_expedited": "1\n", "rcu_normal": "1\n"},
            RcuSettings(1, 1),
            "rcu_expedited is 1 but rcu_normal is 1, which wins",
        ),
        ({"rcu_normal": "1\n"}, RcuSettings(None, 1), "rcu_expedited not readable"),
        ({"rcu_expedited": "x\n"}, RcuSettings(None, None), "rcu_expedited not readable"),
    ],
)
def test_the_hosts_rcu_settings_are_read_and_named(
    tmp_path: Path, files: dict[str, str], settings: RcuSettings, text: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    got = rcu_settings(tmp_path)
    assert got == settings
    assert got.text == text
    # The warning names what the host has.
    assert f"({text})" in thresholds_verdict(9.0, got)[1]
