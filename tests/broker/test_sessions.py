"""Declared sessions: deadlock avoidance (banker's algorithm) in admission and growth, pure."""

from __future__ import annotations

import pytest
from agentcg.broker.admission import (
    Admit,
    Deny,
    Grow,
    NodeView,
    QuotaLevel,
    Refuse,
    SessionClaim,
    SessionKey,
    decide_growth,
    decide_reserve,
    is_safe,
)
from agentcg.broker.model import NodeId, Tenant, TenantName
from hypothesis import given, settings
from hypothesis import strategies as st

MiB = 1 << 20
QUOTA = [QuotaLevel(Tenant(TenantName("t"), 1 << 40), 0)]


def claims(*pairs: tuple[int, int]) -> list[SessionClaim]:
    return [SessionClaim(h * MiB, m * MiB) for h, m in pairs]


@pytest.mark.parametrize(
    ("free", "pairs", "safe"),
    [
        (0, [], True),
        (0, [(10, 10)], True),  # holds its maximum already: it can finish
        (5, [(10, 15)], True),
        (4, [(10, 15)], False),
        # 10 free: B (needs 10) finishes first, gives back 50, then A (needs 55) fits.
        (10, [(45, 100), (50, 60)], True),
        (9, [(45, 100), (50, 60)], False),
        # Each alone would fit after the other, but neither fits first.
        (10, [(50, 70), (50, 70)], False),
    ],
)
def test_is_safe(free: int, pairs: list[tuple[int, int]], safe: bool) -> None:
    assert is_safe(free * MiB, claims(*pairs)) is safe


def view(
    cap: int, granted: int, sessions: dict[str, tuple[int, int]], ratio: float = 0
) -> NodeView:
    cl = {("t", s): SessionClaim(h * MiB, m * MiB) for s, (h, m) in sessions.items()}
    return NodeView(
        NodeId("n"),
        cap * MiB,
        granted * MiB,
        intent_memory_bytes=sum(c.max_bytes for c in cl.values()),
        overcommit_ceiling_bytes=int(cap * MiB * ratio),
        claims=cl,
    )


def reserve(n: NodeView, ask: int, session: str, max_mib: int = 0) -> Admit | Deny:
    key: SessionKey = ("t", session)
    return decide_reserve(
        ask * MiB,
        QUOTA,
        [n],
        session=key,
        session_max_bytes=max_mib * MiB,
        session_node=n.node_id if key in n.claims else None,
    )


def test_growth_that_could_deadlock_waits() -> None:
    # 100 MiB node; A holds 40 of 70, B holds 40 of 70: 20 free. Either may take 20 more only
    # if the other could still finish afterwards: neither could (0 free, both need 30 / 10).
    n = view(100, 80, {"a": (40, 70), "b": (40, 70)})
    assert not is_safe(20 * MiB, n.claims.values())  # already unsafe: admit nothing more
    n = view(100, 70, {"a": (40, 70), "b": (30, 60)})  # 30 free: safe (a finishes first)
    d = reserve(n, 20, "b")  # b to 50 of 60 leaves 10 free: a needs 30, b 10 -> b first: safe
    assert isinstance(d, Admit)
    d = reserve(n, 25, "b", 60)  # b to 55: 5 free; b needs 5 -> then 60 free, a needs 30: safe
    assert isinstance(d, Admit)
    d = reserve(n, 10, "a")  # a to 50 of 70: 20 free; b needs 30, a 20 -> a first: safe
    assert isinstance(d, Admit)
    d = reserve(n, 25, "a")  # a to 65: 5 free; a needs 5, then 70 free: safe
    assert isinstance(d, Admit)
    n = view(100, 80, {"a": (50, 70), "b": (30, 60)})  # 20 free
    d = reserve(n, 15, "b")  # b to 45: 5 free; a needs 20, b 15: neither: unsafe
    assert isinstance(d, Deny) and d.code == "node_unsafe"
    assert "waiting on each other" in d.message


def test_new_session_counts_its_maximum_against_the_ceiling() -> None:
    n = view(100, 20, {"a": (20, 80)}, ratio=1.2)  # 80 of 120 declared
    d = reserve(n, 10, "new", 50)
    assert isinstance(d, Deny) and d.code == "session_admission"
    d = reserve(n, 10, "new", 40)
    assert isinstance(d, Admit)


def test_declared_session_stays_on_its_node() -> None:
    home = view(100, 90, {"a": (90, 95)})
    other = NodeView(NodeId("m"), 1000 * MiB, 0)
    d = decide_reserve(2 * MiB, QUOTA, [other, home], session=("t", "a"), session_node=NodeId("n"))
    assert isinstance(d, Admit) and d.node_id == "n"
    d = decide_reserve(20 * MiB, QUOTA, [other, home], session=("t", "a"), session_node=NodeId("n"))
    assert isinstance(d, Deny) and d.code == "node_capacity"


def test_growth_of_a_declared_session_keeps_the_node_safe() -> None:
    n = view(100, 80, {"a": (50, 70), "b": (30, 60)})
    r = decide_growth(30 * MiB, 45 * MiB, 30 * MiB, QUOTA, n, ("t", "b"))
    assert isinstance(r, Refuse) and r.code == "node_unsafe"
    r = decide_growth(50 * MiB, 70 * MiB, 50 * MiB, QUOTA, n, ("t", "a"))
    assert isinstance(r, Grow) and r.new_memory_bytes == 70 * MiB


@settings(max_examples=150, deadline=None)
@given(
    cap=st.integers(50, 400),
    maxima=st.lists(st.integers(1, 120), min_size=1, max_size=8),
    steps=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 40)), max_size=60),
)
def test_sessions_admitted_this_way_always_finish(
    cap: int, maxima: list[int], steps: list[tuple[int, int]]
) -> None:
    """Sessions that rise towards their maximum, admitted only by ``decide_reserve``, never
    deadlock: at any point, letting the waiting asks wait, the sessions can all finish."""
    held = {f"s{i}": 0 for i in range(len(maxima))}
    top = {f"s{i}": m for i, m in enumerate(maxima)}
    for who, amount in steps:
        s = f"s{who % len(maxima)}"
        ask = min(amount, top[s] - held[s])
        if ask <= 0:
            continue
        granted = sum(held.values())
        live = {k: (held[k], top[k]) for k in held if held[k]}
        d = reserve(view(cap, granted, live), ask, s, top[s])
        if isinstance(d, Admit):
            held[s] += ask
        granted = sum(held.values())
        assert granted <= cap
        # The invariant that rules out deadlock: some order lets every session reach its max.
        assert is_safe(
            (cap - granted) * MiB,
            [SessionClaim(h * MiB, top[k] * MiB) for k, h in held.items() if h],
        )


def test_a_running_session_is_never_held_back_by_the_ceiling() -> None:
    # Over the ceiling already (sessions went past their declared maxima): a running session
    # still gets what is safe; a new one waits.
    n = view(100, 60, {"a": (30, 70), "b": (30, 70)}, ratio=1.2)  # 140 of 120 declared
    assert isinstance(reserve(n, 5, "a"), Admit)
    d = reserve(n, 5, "new", 10)
    assert isinstance(d, Deny) and d.code == "session_admission"


def test_a_new_session_waits_while_started_ones_wait() -> None:
    n = view(100, 10, {"a": (10, 20)})
    d = decide_reserve(
        5 * MiB,
        QUOTA,
        [n],
        session=("t", "new"),
        session_max_bytes=10 * MiB,
        started_sessions_waiting=1,
    )
    assert isinstance(d, Deny) and d.code == "session_admission" and "1 running" in d.message
    d = decide_reserve(
        5 * MiB,
        QUOTA,
        [n],
        session=("t", "a"),
        session_node=NodeId("n"),
        started_sessions_waiting=1,
    )
    assert isinstance(d, Admit)
