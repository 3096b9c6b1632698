"""The node's graduated policy: pure, table-driven."""

from __future__ import annotations

import pytest
from agentcg.node.enforcement import (
    AskBroker,
    CallPhase,
    CallView,
    Ignore,
    Kill,
    NodePolicy,
    Resize,
    on_deadline,
    on_decision_grow,
    on_limit,
    soft_threshold,
)

MiB = 1 << 20


def call(phase: CallPhase = CallPhase.RUNNING, budget: int = 64 * MiB) -> CallView:
    return CallView("l1", phase, budget, budget)


def test_limit_asks_for_double_or_min_step() -> None:
    assert on_limit(call(budget=64 * MiB), NodePolicy()) == AskBroker(128 * MiB)
    assert on_limit(call(budget=8 * MiB), NodePolicy()) == AskBroker(40 * MiB)  # +32 MiB minimum


@pytest.mark.parametrize("phase", [CallPhase.PAUSED, CallPhase.KILLED, CallPhase.EXITED])
def test_limit_while_not_running_is_ignored(phase: CallPhase) -> None:
    assert isinstance(on_limit(call(phase), NodePolicy()), Ignore)


def test_grow_applies_only_to_a_paused_call_and_only_upwards() -> None:
    assert on_decision_grow(call(CallPhase.PAUSED), 128 * MiB) == Resize(
        128 * MiB, "broker grew budget to 128.0 MiB"
    )
    assert isinstance(on_decision_grow(call(CallPhase.RUNNING), 128 * MiB), Ignore)
    assert isinstance(on_decision_grow(call(CallPhase.PAUSED), 64 * MiB), Ignore)


def test_deadline_kills_by_default_naming_budget_and_peak() -> None:
    d = on_deadline(call(CallPhase.PAUSED), 1 << 40, NodePolicy(broker_timeout_s=2))
    assert isinstance(d, Kill)
    assert (
        "within 2 s" in d.reason and "budget 64.0 MiB" in d.reason and "peak 64.0 MiB" in d.reason
    )


def test_deadline_grows_locally_when_configured_and_room() -> None:
    policy = NodePolicy(on_timeout="grow-local")
    assert isinstance(on_deadline(call(CallPhase.PAUSED), 1 << 30, policy), Resize)
    assert isinstance(on_deadline(call(CallPhase.PAUSED), 1 * MiB, policy), Kill)
    assert isinstance(on_deadline(call(CallPhase.RUNNING), 1 << 30, policy), Ignore)


def test_soft_threshold_below_budget() -> None:
    assert soft_threshold(100, NodePolicy(soft_fraction=0.8)) == 80
