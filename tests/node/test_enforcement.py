"""The node's graduated policy: pure, table-driven."""

from __future__ import annotations

import pytest
from agentcg.node.enforcement import (
    FLUSH_OUTPUT_MIN_BYTES,
    AskBroker,
    CallPhase,
    CallView,
    Defer,
    FlushOutput,
    HoldOutput,
    Ignore,
    Kill,
    NodePolicy,
    Pause,
    Recheck,
    ReleaseOutput,
    Resize,
    Unthrottle,
    Wake,
    at_limit,
    on_deadline,
    on_decision_grow,
    on_limit,
    on_output,
    on_pause_notice,
    on_throttle_deadline,
    soft_threshold,
)
from agentcg.quantity import format_bytes

MiB = 1 << 20


def call(phase: CallPhase = CallPhase.RUNNING, budget: int = 64 * MiB) -> CallView:
    return CallView("l1", phase, budget, budget)


def test_limit_asks_for_double_or_min_step() -> None:
    assert on_limit(call(budget=64 * MiB), NodePolicy()) == AskBroker(128 * MiB)
    assert on_limit(call(budget=8 * MiB), NodePolicy()) == AskBroker(40 * MiB)  # +32 MiB minimum


def test_limit_event_from_before_the_last_raise_is_rechecked() -> None:
    policy = NodePolicy()
    grown = call(budget=128 * MiB)
    # Reported 2 ms before the limit went up to 128 MiB: about the old limit.
    stale = on_limit(grown, policy, event_ns=10_000_000, limit_set_ns=12_000_000)
    assert isinstance(stale, Recheck) and "2.0 ms older" in stale.reason
    # After the raise (or never raised, or no kernel time): a real hit, ask.
    assert on_limit(grown, policy, 12_000_001, 12_000_000) == AskBroker(256 * MiB)
    assert on_limit(grown, policy, 5, 0) == AskBroker(256 * MiB)
    assert on_limit(grown, policy, 0, 12_000_000) == AskBroker(256 * MiB)
    # Not running: ignored whatever its time.
    assert isinstance(on_limit(call(CallPhase.PAUSED), policy, 1, 2), Ignore)


@pytest.mark.parametrize(
    ("usage", "budget", "expected"),
    [
        (64 * MiB, 64 * MiB, True),
        (64 * MiB - 256 * 1024, 64 * MiB, True),  # per-CPU charge batches held back
        (63 * MiB - 1, 64 * MiB, False),
        (40 * MiB, 128 * MiB, False),  # the old limit's usage under a raised one
    ],
)
def test_at_limit(usage: int, budget: int, expected: bool) -> None:
    assert at_limit(usage, budget) is expected


@pytest.mark.parametrize(
    ("phase", "usage", "under_oom", "expected"),
    [
        # Held at its limit with nobody asking (its LIMIT report lost or judged stale): ask.
        (CallPhase.RUNNING, 64 * MiB, True, AskBroker(128 * MiB)),
        (CallPhase.THROTTLED, 64 * MiB - 256 * 1024, True, AskBroker(128 * MiB)),
        # Waiting well below its limit: woken by a raise and not run since, or a raise overtook
        # its way into the wait. Looked at again a little later (Defer), then woken.
        (CallPhase.RUNNING, 40 * MiB, True, Defer),
        # Nothing waits (woken meanwhile), or its ask is already out, or it is ending.
        (CallPhase.RUNNING, 64 * MiB, False, Ignore),
        (CallPhase.PAUSED, 64 * MiB, True, Ignore),
        (CallPhase.KILLED, 64 * MiB, True, Ignore),
        (CallPhase.EXITED, 64 * MiB, True, Ignore),
    ],
)
def test_pause_notice(
    phase: CallPhase, usage: int, under_oom: bool, expected: AskBroker | type
) -> None:
    decision = on_pause_notice(call(phase), usage, under_oom, NodePolicy())
    if isinstance(expected, AskBroker):
        assert decision == expected
    else:
        assert type(decision) is expected
    # Looked at again: the same answers, except that one still waiting below its limit is woken.
    again = on_pause_notice(call(phase), usage, under_oom, NodePolicy(), settled=True)
    if isinstance(decision, Defer):
        assert decision.after_s == NodePolicy().pause_settle_s
        assert isinstance(again, Wake)
        assert "40.0 MiB below its 64.0 MiB budget" in again.reason
    else:
        assert again == decision


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


# --- the throttle step and denials ----------------------------------------------------------

from agentcg.node.enforcement import (  # noqa: E402
    Throttle,
    on_denied,
    on_soft,
)


@pytest.mark.parametrize(
    ("phase", "policy", "expected"),
    [
        (CallPhase.RUNNING, NodePolicy(), Throttle),
        (CallPhase.RUNNING, NodePolicy(throttle=False), Ignore),
        (CallPhase.THROTTLED, NodePolicy(), Ignore),
        (CallPhase.PAUSED, NodePolicy(), Ignore),
        (CallPhase.KILLED, NodePolicy(), Ignore),
    ],
)
def test_soft_threshold_throttles_running_calls(
    phase: CallPhase, policy: NodePolicy, expected: type
) -> None:
    assert isinstance(on_soft(call(phase), policy), expected)


def test_throttle_is_at_the_soft_threshold_with_a_deadline() -> None:
    t = on_soft(call(budget=100 * MiB), NodePolicy(soft_fraction=0.5, throttle_deadline_s=1.5))
    assert isinstance(t, Throttle)
    assert (t.high_bytes, t.deadline_s) == (50 * MiB, 1.5)


@pytest.mark.parametrize(
    ("phase", "usage", "expected"),
    [
        (CallPhase.THROTTLED, 60 * MiB, Pause),  # still above 80% of 64 MiB at the deadline
        (CallPhase.THROTTLED, 40 * MiB, Unthrottle),  # came back down: lift it
        (CallPhase.PAUSED, 60 * MiB, Ignore),  # hit the limit meanwhile: already asking
        (CallPhase.RUNNING, 60 * MiB, Ignore),
    ],
)
def test_throttle_deadline(phase: CallPhase, usage: int, expected: type) -> None:
    assert isinstance(on_throttle_deadline(call(phase), usage, NodePolicy()), expected)


def test_throttle_deadline_pause_asks_for_growth() -> None:
    p = on_throttle_deadline(call(CallPhase.THROTTLED), 60 * MiB, NodePolicy())
    assert isinstance(p, Pause) and p.requested_bytes == 128 * MiB


def test_limit_while_throttled_asks_broker() -> None:
    assert on_limit(call(CallPhase.THROTTLED), NodePolicy()) == AskBroker(128 * MiB)


@pytest.mark.parametrize(
    ("phase", "at_limit", "expected"),
    [
        (CallPhase.PAUSED, True, Kill),  # held by the kernel at its budget: killed
        (CallPhase.PAUSED, False, Unthrottle),  # paused by the node within budget: resumed
        (CallPhase.RUNNING, True, Ignore),
    ],
)
def test_denial(phase: CallPhase, at_limit: bool, expected: type) -> None:
    assert isinstance(on_denied(call(phase), at_limit, "denied"), expected)


@pytest.mark.parametrize(
    ("policy", "budget", "arm", "stop"),
    [
        (NodePolicy(), 64 << 20, int((64 << 20) * 0.8 * 0.5), 0),  # stop off by default
        (NodePolicy(stop_fraction=0.9), 64 << 20, int((64 << 20) * 0.4), int((64 << 20) * 0.9)),
        (NodePolicy(arm_fraction=0.0), 64 << 20, 4096, 0),  # armed from the first page
        (NodePolicy(), 0, 4096, 0),
    ],
)
def test_arm_and_stop_thresholds(policy: NodePolicy, budget: int, arm: int, stop: int) -> None:
    from agentcg.node.enforcement import arm_threshold, stop_threshold

    assert arm_threshold(budget, policy) == arm
    assert stop_threshold(budget, policy) == stop


@pytest.mark.parametrize(
    ("held_mib", "holding", "limit_mib", "want"),
    [
        (64, False, 64, Ignore),  # at the limit: not above it
        (65, False, 64, HoldOutput),
        (500, True, 64, Ignore),  # held already
        (33, True, 64, Ignore),  # its caller has not had enough yet
        (32, True, 64, ReleaseOutput),  # half the limit: released
        (5000, False, 0, Ignore),  # no limit
        (5000, True, 0, ReleaseOutput),  # held, then the limit was lifted
    ],
)
def test_output_above_the_limit_holds_the_call_until_half_of_it(
    held_mib: int, holding: bool, limit_mib: int, want: type
) -> None:
    policy = NodePolicy(max_output_bytes=limit_mib * MiB)
    verdict = on_output(held_mib * MiB, holding, policy)
    assert type(verdict) is want, verdict
    if want is HoldOutput:
        assert verdict.reason.startswith(
            "output: 65.0 MiB not yet had by a caller, above the node's 64.0 MiB"
        ), verdict


def with_output(
    cached: int, phase: CallPhase = CallPhase.RUNNING, budget: int = 64 * MiB
) -> CallView:
    return CallView("l1", phase, budget, budget, output_cached_bytes=cached)


@pytest.mark.parametrize(
    ("cached", "flush"),
    [
        (0, False),
        (FLUSH_OUTPUT_MIN_BYTES - 1, False),  # too little to make the room an ask is for
        (FLUSH_OUTPUT_MIN_BYTES, True),
        (60 * MiB, True),
    ],
)
def test_cached_output_is_flushed_before_asking_for_more(cached: int, flush: bool) -> None:
    """At its limit (a LIMIT event, the kernel's notice of a task waiting there) or still
    above its soft threshold at the throttle deadline: a call whose cached output could be
    what fills it has it flushed first; the node decides again after, from its usage then."""
    policy = NodePolicy()
    view = with_output(cached)
    throttled = with_output(cached, CallPhase.THROTTLED)
    decisions = [
        on_limit(view, policy),
        on_limit(throttled, policy),
        on_pause_notice(view, 64 * MiB, True, policy),
        on_throttle_deadline(throttled, soft_threshold(64 * MiB, policy), policy),
    ]
    if flush:
        for d in decisions:
            assert isinstance(d, FlushOutput), d
            assert f"{format_bytes(cached)} of its usage is its output" in d.reason
    else:
        assert decisions[:3] == [AskBroker(128 * MiB)] * 3
        assert isinstance(decisions[3], Pause) and decisions[3].requested_bytes == 128 * MiB


def test_cached_output_changes_nothing_else() -> None:
    """Not at its limit, not running, a stale limit event, back below its soft threshold: as
    without output."""
    policy = NodePolicy()
    cached = 32 * MiB
    assert isinstance(on_limit(with_output(cached, CallPhase.PAUSED), policy), Ignore)
    stale = on_limit(with_output(cached, budget=128 * MiB), policy, 1, 2)
    assert isinstance(stale, Recheck)
    assert isinstance(on_pause_notice(with_output(cached), 64 * MiB, False, policy), Ignore)
    below = on_pause_notice(with_output(cached), 40 * MiB, True, policy)
    assert isinstance(below, Defer)
    throttled = with_output(cached, CallPhase.THROTTLED)
    assert isinstance(on_throttle_deadline(throttled, 10 * MiB, policy), Unthrottle)
    assert isinstance(on_throttle_deadline(with_output(cached), 60 * MiB, policy), Ignore)
