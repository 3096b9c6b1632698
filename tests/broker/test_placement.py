"""Placement reads the ledger's index of the nodes that take work (``Ledger.placement_views``):
the same decisions as on every node's view, however the nodes' leases, streams, pressure and
capacities change, at a cost that does not grow with the number of nodes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from agentcg.broker.admission import Admit, Deny, decide_reserve
from agentcg.broker.ledger import Ledger
from agentcg.broker.model import (
    Lease,
    LeaseId,
    LeaseState,
    Node,
    NodeId,
    PutLease,
    PutNode,
    SessionName,
    Tenant,
    TenantName,
)
from hypothesis import given, settings
from hypothesis import strategies as st

MiB = 1 << 20
TENANT = TenantName("t")


def node(i: int, capacity_mib: int) -> Node:
    return Node(NodeId(f"n{i}"), f"10.0.0.{i}:1", capacity_mib * MiB, 0, 0)


def cluster(capacities_mib: list[int], ratio: float = 0.0, quota_mib: int = 1 << 20) -> Ledger:
    ledger = Ledger(overcommit_ratio=ratio)
    nodes = [node(i, c) for i, c in enumerate(capacities_mib)]
    ledger.load([Tenant(TENANT, quota_mib * MiB)], nodes, [])
    for n in nodes:
        ledger.set_connected(n.node_id, True)
    return ledger


def lease(i: int, node_id: NodeId, budget_mib: int, intent_mib: int) -> Lease:
    return Lease(
        LeaseId(f"l{i}"),
        TENANT,
        SessionName("s"),
        "c",
        node_id,
        budget_mib * MiB,
        intent_mib * MiB,
        0,
        60_000,
    )


def both(ledger: Ledger, ask_mib: int, intent_mib: int) -> tuple[Admit | Deny, Admit | Deny]:
    """The decision on the placement views, and on every node's view."""
    levels = ledger.quota_levels(TENANT)
    budget, intent = ask_mib * MiB, max(ask_mib, intent_mib) * MiB
    fast = decide_reserve(
        budget, levels, ledger.placement_views(intent), intent_bytes=intent_mib * MiB
    )
    full = decide_reserve(budget, levels, ledger.node_views(), intent_bytes=intent_mib * MiB)
    return fast, full


OPS = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 600), st.integers(0, 900)),
    st.tuples(st.just("release"), st.integers(0, 1000)),
    st.tuples(st.just("connect"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("pressure"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("cordon"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("register"), st.integers(0, 5), st.integers(0, 2000)),
)


@settings(max_examples=300, deadline=None)
@given(
    capacities=st.lists(st.sampled_from([0, 256, 512, 1024, 2048]), min_size=1, max_size=6),
    ratio=st.sampled_from([0.0, 1.0, 1.5]),
    quota_mib=st.sampled_from([512, 4096, 1 << 20]),
    ops=st.lists(OPS, max_size=60),
)
def test_placement_views_decide_as_every_node_view(
    capacities: list[int], ratio: float, quota_mib: int, ops: list[tuple[object, ...]]
) -> None:
    """Whatever happened to the nodes, a Reserve is decided on the placement views exactly as on
    every node's view: the same node, or the same denial with the same hint and message."""
    ledger = cluster(capacities, ratio, quota_mib)
    n = len(capacities)
    granted: list[Lease] = []
    for k, op in enumerate(ops):
        if op[0] == "reserve":
            _, ask_mib, intent_mib = op
            assert isinstance(ask_mib, int) and isinstance(intent_mib, int)
            fast, full = both(ledger, ask_mib, intent_mib)
            assert fast == full
            if isinstance(fast, Admit):
                le = lease(k, fast.node_id, ask_mib, max(ask_mib, intent_mib))
                ledger.apply([PutLease(le)])
                granted.append(le)
        elif op[0] == "release" and granted:
            assert isinstance(op[1], int)
            le = granted.pop(op[1] % len(granted))
            ledger.apply([PutLease(replace(le, state=LeaseState.RELEASED, ended_at_ms=1))])
        elif op[0] == "connect":
            _, i, on = op
            assert isinstance(i, int) and isinstance(on, bool)
            ledger.set_connected(NodeId(f"n{i % n}"), on)
        elif op[0] == "pressure":
            _, i, on = op
            assert isinstance(i, int) and isinstance(on, bool)
            ledger.set_pressured(NodeId(f"n{i % n}"), on)
        elif op[0] == "cordon":
            _, i, on = op
            assert isinstance(i, int) and isinstance(on, bool)
            old = ledger.nodes[NodeId(f"n{i % n}")]
            ledger.apply([PutNode(replace(old, cordoned_at_ms=1 if on else 0))])
        elif op[0] == "register":
            _, i, capacity_mib = op
            assert isinstance(i, int) and isinstance(capacity_mib, int)
            ledger.apply([PutNode(node(i % n, capacity_mib))])
        # Asks every decision path can take: one that fits, one no node has room for, one
        # whose intent no ceiling takes.
        for ask_mib, intent_mib in ((1, 1), (3000, 3000), (1, 1 << 20)):
            fast, full = both(ledger, ask_mib, intent_mib)
            assert fast == full


def test_one_view_places_among_a_thousand_nodes() -> None:
    """With no ceiling in the way, placement looks at one node (the emptiest), not 1,000."""
    ledger = cluster([1024] * 1000, ratio=1.5)
    for k in range(200):
        (view,) = ledger.placement_views(64 * MiB)
        d = decide_reserve(64 * MiB, ledger.quota_levels(TENANT), [view])
        assert isinstance(d, Admit) and d.node_id == view.node_id
        ledger.apply([PutLease(lease(k, d.node_id, 64, 64))])
    # Spread over the emptiest nodes: 200 calls on 200 different nodes.
    assert len({le.node_id for le in ledger.leases.values()}) == 200


def test_a_full_ceiling_is_passed_over() -> None:
    """The emptiest node is at its overcommit ceiling: the next one takes the call."""
    ledger = cluster([1024, 512], ratio=1.0)
    ledger.apply([PutLease(lease(0, NodeId("n0"), 64, 1000))])  # n0: 960 MiB free, 1000 declared
    views = ledger.placement_views(64 * MiB)
    assert [v.node_id for v in views] == ["n0", "n1"]
    d = decide_reserve(64 * MiB, ledger.quota_levels(TENANT), views, intent_bytes=64 * MiB)
    assert d == Admit(NodeId("n1"), 64 * MiB)


@pytest.mark.parametrize("how", ["disconnected", "pressured", "cordoned"])
def test_a_node_that_takes_no_work_is_not_offered(how: str) -> None:
    """Neither placed on, nor counted in a denial's hint of what would fit now."""
    ledger = cluster([4096, 256], quota_mib=1024)
    n0 = ledger.nodes[NodeId("n0")]
    if how == "disconnected":
        ledger.set_connected(NodeId("n0"), False)
    elif how == "pressured":
        ledger.set_pressured(NodeId("n0"), True)
    else:
        ledger.apply([PutNode(replace(n0, cordoned_at_ms=1, cordon_reason="kernel upgrade"))])
    assert [v.node_id for v in ledger.placement_views(MiB)] == ["n1"]
    d = decide_reserve(2048 * MiB, ledger.quota_levels(TENANT), ledger.node_views())
    assert isinstance(d, Deny) and d.code == "tenant_quota"
    assert d.largest_memory_bytes_available == 256 * MiB  # n1's, not n0's 4 GiB
    ledger.set_connected(NodeId("n0"), True)
    ledger.set_pressured(NodeId("n0"), False)
    ledger.apply([PutNode(n0)])
    assert [v.node_id for v in ledger.placement_views(MiB)][0] == "n0"
