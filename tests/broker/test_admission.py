"""Admission and growth policy: table-driven edge cases and properties, no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest
from agentcg.broker.admission import (
    MIN_GROWTH_BYTES,
    Admit,
    Deny,
    Grow,
    NodeView,
    QuotaLevel,
    Refuse,
    decide_growth,
    decide_reserve,
)
from agentcg.broker.model import NodeId, Tenant, TenantName
from hypothesis import given
from hypothesis import strategies as st

MiB = 1 << 20


def level(
    name: str,
    quota: int,
    granted: int = 0,
    parent: str | None = None,
    calls: int = 0,
    max_calls: int = 0,
) -> QuotaLevel:
    return QuotaLevel(
        Tenant(
            TenantName(name), quota, TenantName(parent) if parent else None, max_calls=max_calls
        ),
        granted,
        calls,
    )


def node(
    nid: str, cap: int, granted: int = 0, connected: bool = True, pressured: bool = False
) -> NodeView:
    return NodeView(NodeId(nid), cap, granted, connected, pressured)


@pytest.mark.parametrize(
    ("ask", "levels", "nodes", "expect"),
    [
        (64 * MiB, [level("t", 128 * MiB)], [node("a", 1024 * MiB)], ("admit", "a")),
        (
            128 * MiB,
            [level("t", 128 * MiB)],
            [node("a", 1024 * MiB)],
            ("admit", "a"),
        ),  # exactly fits
        (129 * MiB, [level("t", 128 * MiB)], [node("a", 1024 * MiB)], ("deny", "tenant_quota")),
        (
            64 * MiB,
            [level("t", 128 * MiB, 100 * MiB)],
            [node("a", 1024 * MiB)],
            ("deny", "tenant_quota"),
        ),
        # the parent (org) is the tighter level
        (
            64 * MiB,
            [level("t", 1024 * MiB), level("org", 100 * MiB, 50 * MiB)],
            [node("a", 4096 * MiB)],
            ("deny", "tenant_quota"),
        ),
        (64 * MiB, [level("t", 1024 * MiB)], [], ("deny", "no_nodes")),
        (
            64 * MiB,
            [level("t", 1024 * MiB)],
            [node("a", 1024 * MiB, connected=False)],
            ("deny", "no_nodes"),
        ),
        (
            64 * MiB,
            [level("t", 1024 * MiB)],
            [node("a", 1024 * MiB, pressured=True)],
            ("deny", "no_nodes"),
        ),
        (
            64 * MiB,
            [level("t", 1024 * MiB)],
            [node("a", 0)],
            ("deny", "node_capacity"),
        ),  # zero capacity
        (
            64 * MiB,
            [level("t", 1024 * MiB)],
            [node("a", 100 * MiB, 50 * MiB), node("b", 100 * MiB, 10 * MiB)],
            ("admit", "b"),
        ),
        (
            64 * MiB,
            [level("t", 1024 * MiB, calls=2, max_calls=2)],
            [node("a", 1024 * MiB)],
            ("deny", "tenant_calls"),
        ),
    ],
)
def test_decide_reserve(
    ask: int, levels: list[QuotaLevel], nodes: list[NodeView], expect: tuple[str, str]
) -> None:
    d = decide_reserve(ask, levels, nodes)
    if expect[0] == "admit":
        assert isinstance(d, Admit) and d.node_id == expect[1] and d.memory_bytes == ask
    else:
        assert isinstance(d, Deny) and d.code == expect[1]
        assert d.retry_after_ms > 0


def test_denial_names_tenant_limit_and_what_is_free() -> None:
    d = decide_reserve(
        4096 * MiB, [level("t-42", 8192 * MiB, 6144 * MiB)], [node("a", 65536 * MiB)]
    )
    assert isinstance(d, Deny)
    assert (
        d.message == "tenant t-42: memory quota exceeded (asked 4.0 GiB, 2.0 GiB of 8.0 GiB free)"
    )
    assert d.largest_memory_bytes_available == 2048 * MiB


def test_memory_kept_for_paused_calls_is_not_free() -> None:
    """Room kept for paused calls waiting to grow counts as taken, at a quota level and on a
    node, and a denial says so; placement picks the node with the most room not kept."""
    kept_in_tenant = replace(level("t", 256 * MiB, 100 * MiB), held_memory_bytes=100 * MiB)
    d = decide_reserve(64 * MiB, [kept_in_tenant], [node("a", 1024 * MiB)])
    assert isinstance(d, Deny) and d.code == "tenant_quota"
    assert d.message == (
        "tenant t: memory quota exceeded (asked 64.0 MiB, 56.0 MiB of 256.0 MiB free; "
        "100.0 MiB kept for paused calls waiting to grow)"
    )
    kept_on_a = replace(node("a", 1024 * MiB, 512 * MiB), held_memory_bytes=300 * MiB)
    d = decide_reserve(256 * MiB, [level("t", 4096 * MiB)], [kept_on_a])
    assert isinstance(d, Deny) and d.code == "node_capacity"
    assert d.largest_memory_bytes_available == 212 * MiB
    assert "kept for paused calls" in d.message
    d = decide_reserve(256 * MiB, [level("t", 4096 * MiB)], [kept_on_a, node("b", 512 * MiB)])
    assert isinstance(d, Admit) and d.node_id == "b"


@pytest.mark.parametrize(
    ("current", "requested", "levels", "nd", "expect"),
    [
        (
            64 * MiB,
            128 * MiB,
            [level("t", 1024 * MiB, 64 * MiB)],
            node("a", 1024 * MiB, 64 * MiB),
            ("grow", 128 * MiB),
        ),
        # partial: only 32 MiB left in the tenant
        (
            64 * MiB,
            128 * MiB,
            [level("t", 96 * MiB, 64 * MiB)],
            node("a", 1024 * MiB, 64 * MiB),
            ("grow", 96 * MiB),
        ),
        # nothing left in the tenant
        (
            96 * MiB,
            192 * MiB,
            [level("t", 96 * MiB, 96 * MiB)],
            node("a", 1024 * MiB, 96 * MiB),
            ("refuse", "tenant_quota"),
        ),
        # tenant has room, node does not
        (
            64 * MiB,
            128 * MiB,
            [level("t", 1024 * MiB, 64 * MiB)],
            node("a", 66 * MiB, 64 * MiB),
            ("refuse", "node_capacity"),
        ),
        # less than the minimum step is refused
        (
            64 * MiB,
            128 * MiB,
            [level("t", 64 * MiB + MIN_GROWTH_BYTES - 1, 64 * MiB)],
            node("a", 1024 * MiB),
            ("refuse", "tenant_quota"),
        ),
        # asked again for what was already granted (the first answer lost): granted again,
        # even with nothing left anywhere
        (
            128 * MiB,
            128 * MiB,
            [level("t", 128 * MiB, 128 * MiB)],
            node("a", 128 * MiB, 128 * MiB),
            ("grow", 128 * MiB),
        ),
    ],
)
def test_decide_growth(
    current: int, requested: int, levels: list[QuotaLevel], nd: NodeView, expect: tuple[str, object]
) -> None:
    d = decide_growth(current, requested, current, levels, nd)
    if expect[0] == "grow":
        assert isinstance(d, Grow) and d.new_memory_bytes == expect[1]
    else:
        assert isinstance(d, Refuse) and d.code == expect[1]


def test_refusal_names_budget_peak_and_quota() -> None:
    d = decide_growth(
        96 * MiB,
        192 * MiB,
        96 * MiB,
        [level("poor", 96 * MiB, 96 * MiB)],
        node("a", 1024 * MiB, 96 * MiB),
    )
    assert isinstance(d, Refuse)
    assert "tenant poor" in d.message and "budget 96.0 MiB" in d.message
    assert "peak 96.0 MiB" in d.message and "quota 96.0 MiB" in d.message


sizes = st.integers(min_value=1, max_value=1 << 40)


@given(
    ask=sizes,
    quotas=st.lists(
        st.tuples(sizes, st.integers(min_value=0, max_value=1 << 40)), min_size=1, max_size=4
    ),
    caps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=1 << 41), st.integers(min_value=0, max_value=1 << 41)
        ),
        max_size=4,
    ),
)
def test_admitted_never_exceeds_any_level_or_node(
    ask: int, quotas: list[tuple[int, int]], caps: list[tuple[int, int]]
) -> None:
    levels = [level(f"t{i}", q, g) for i, (q, g) in enumerate(quotas)]
    nodes = [node(f"n{i}", c, g) for i, (c, g) in enumerate(caps)]
    d = decide_reserve(ask, levels, nodes)
    if isinstance(d, Admit):
        for lv in levels:
            assert lv.granted_memory_bytes + ask <= lv.tenant.memory_quota_bytes
        chosen = next(n for n in nodes if n.node_id == d.node_id)
        assert chosen.granted_memory_bytes + ask <= chosen.memory_capacity_bytes


@given(
    current=sizes,
    extra=sizes,
    quotas=st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4),
    cap=st.tuples(sizes, sizes),
)
def test_growth_never_exceeds_any_level_or_node(
    current: int, extra: int, quotas: list[tuple[int, int]], cap: tuple[int, int]
) -> None:
    levels = [level(f"t{i}", q, g) for i, (q, g) in enumerate(quotas)]
    nd = node("n", cap[0], cap[1])
    d = decide_growth(current, current + extra, current, levels, nd)
    if isinstance(d, Grow):
        delta = d.new_memory_bytes - current
        assert 0 < delta <= extra
        for lv in levels:
            assert lv.granted_memory_bytes + delta <= lv.tenant.memory_quota_bytes
        assert nd.granted_memory_bytes + delta <= nd.memory_capacity_bytes
