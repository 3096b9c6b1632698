"""Queue order, weighted fair share, preemption and expiry: pure policy, table + properties."""

from __future__ import annotations

from agentcg.broker.admission import Grow, NodeView, QuotaLevel, decide_growth
from agentcg.broker.fairshare import (
    Candidate,
    FairQueue,
    WaitingAsk,
    _without,
    choose_victims,
    growth_victims,
    pick_next,
)
from agentcg.broker.ledger import Ledger
from agentcg.broker.model import (
    Lease,
    LeaseId,
    LeaseState,
    NodeId,
    PutLease,
    SessionName,
    Tenant,
    TenantName,
)
from hypothesis import given, settings
from hypothesis import strategies as st

MiB = 1 << 20
T = TenantName


def w(seq: int, tenant: str, priority: int = 0, mib: int = 1) -> WaitingAsk:
    return WaitingAsk(seq, T(tenant), priority, mib * MiB)


def test_priority_then_weighted_usage_then_arrival() -> None:
    waiting = [w(0, "a"), w(1, "b"), w(2, "c", priority=5), w(3, "a")]
    granted = {T("a"): 10 * MiB, T("b"): 30 * MiB, T("c"): 99 * MiB}
    weights = {T("a"): 1, T("b"): 4, T("c"): 1}
    assert pick_next(waiting, granted, weights).seq == 2  # priority class first
    rest = [x for x in waiting if x.seq != 2]
    assert pick_next(rest, granted, weights).seq == 1  # b: 30/4 < a: 10/1
    assert pick_next(rest, granted, weights, skip={1}).seq == 0  # a's first arrival
    assert pick_next([], granted, weights) is None


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(1, 8), min_size=2, max_size=6),
    capacity=st.integers(50, 400),
    churn=st.lists(st.integers(0, 10_000), max_size=60),
)
def test_fair_share_converges_to_weights(
    weights: list[int], capacity: int, churn: list[int]
) -> None:
    """Every tenant backlogged with unit asks; capacity handed out one unit at a time by
    pick_next, with random releases in between: the holdings per unit of weight end within one
    unit of each other (max-min fair at unit granularity), so each tenant holds its weighted
    share capacity x weight / sum(weights) to within its weight in units."""
    names = [T(f"t{i}") for i in range(len(weights))]
    weight = dict(zip(names, weights, strict=True))
    granted = dict.fromkeys(names, 0)
    seq = 0

    def fill() -> None:
        nonlocal seq
        while sum(granted.values()) < capacity:
            waiting = [WaitingAsk(seq + i, n, 0, 1) for i, n in enumerate(names)]
            seq += len(names)
            nxt = pick_next(waiting, granted, weight)
            assert nxt is not None
            granted[nxt.tenant] += 1

    fill()
    for r in churn:  # a release somewhere, then the freed unit is handed out again
        holders = [n for n in names if granted[n]]
        granted[holders[r % len(holders)]] -= 1
        fill()
    total = sum(weights)
    per_weight = [granted[n] / weight[n] for n in names]
    assert max(per_weight) - min(per_weight) <= 1 + 1e-9, (granted, weight)
    for n in names:
        assert abs(granted[n] - capacity * weight[n] / total) <= weight[n] + 1e-9, (granted, weight)


@settings(max_examples=300, deadline=None)
@given(
    waiting=st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(0, 2), st.integers(1, 4)), max_size=40
    ),
    weights=st.fixed_dictionaries({t: st.integers(1, 4) for t in "abcd"}),
    granted=st.fixed_dictionaries({t: st.integers(0, 20) for t in "abcd"}),
    outcomes=st.lists(st.sampled_from(["admit", "skip", "hold"]), max_size=60),
)
def test_fair_queue_gives_pick_nexts_order(
    waiting: list[tuple[str, int, int]],
    weights: dict[str, int],
    granted: dict[str, int],
    outcomes: list[str],
) -> None:
    """FairQueue pops the waiters in the order pick_next picks them one after another (those
    tried passed over), while admissions and other changes move the tenants' holdings."""
    asks = [w(seq, t, p, mib) for seq, (t, p, mib) in enumerate(waiting)]
    weight = {T(t): v for t, v in weights.items()}
    held = {T(t): v * MiB for t, v in granted.items()}
    fq = FairQueue(asks, held, weight)
    tried: set[int] = set()
    for k, outcome in enumerate(outcomes):
        expect = pick_next(asks, held, weight, tried)
        got = fq.pop()
        assert got == expect
        if got is None:
            break
        tried.add(got.seq)
        if outcome == "admit":  # the tenant holds what it got
            held[got.tenant] += got.memory_bytes
            fq.hold(got.tenant, held[got.tenant])
        elif outcome == "hold":  # another tenant's lease ended (or was preempted)
            other = T("abcd"[k % 4])
            held[other] = max(0, held[other] - 3 * MiB)
            fq.hold(other, held[other])


def lvl(name: str, quota_mib: int, granted_mib: int) -> QuotaLevel:
    return QuotaLevel(Tenant(T(name), quota_mib * MiB), granted_mib * MiB)


def cand(
    lid: str, priority: int, at: int, mib: int, tenant: str = "t", node: str = "n"
) -> Candidate:
    return Candidate(
        LeaseId(lid), priority, at, mib * MiB, 0, NodeId(node), frozenset({T(tenant), T("org")})
    )


NODE = [NodeView(NodeId("n"), 1 << 40, 0)]


def test_victims_lowest_priority_then_youngest_and_only_as_many_as_needed() -> None:
    levels = [lvl("t", 100, 100), lvl("org", 1000, 100)]
    cands = [
        cand("old-low", 0, 1, 40),
        cand("young-low", 0, 9, 40),
        cand("mid", 1, 5, 40),
        cand("high", 7, 5, 40),
    ]
    got = choose_victims(30 * MiB, 5, levels, NODE, cands)
    assert [c.lease_id for c in got or []] == ["young-low"]
    got = choose_victims(70 * MiB, 5, levels, NODE, cands)
    assert [c.lease_id for c in got or []] == ["young-low", "old-low"]
    # Never a lease of equal or higher priority; None when even all would not do.
    assert choose_victims(150 * MiB, 5, levels, NODE, cands) is None
    assert choose_victims(30 * MiB, 0, levels, NODE, cands) is None


def test_victims_only_where_they_relieve_the_limit() -> None:
    # The asking tenant "t" is at its quota; a lease of "u" (not under t) cannot help.
    levels = [lvl("t", 50, 50), lvl("org", 1000, 90)]
    other = Candidate(LeaseId("u1"), 0, 1, 40 * MiB, 0, NodeId("n"), frozenset({T("u"), T("org")}))
    assert choose_victims(10 * MiB, 5, levels, NODE, [other]) is None
    mine = cand("t1", 0, 1, 50)
    assert [c.lease_id for c in choose_victims(10 * MiB, 5, levels, NODE, [other, mine]) or []] == [
        "t1"
    ]


def test_growth_victims_on_the_paused_call_s_node() -> None:
    """A paused call of priority 5 on full node "n" (100 MiB: its own 28 MiB + 70 MiB of
    others) asking to grow 28 -> 56 MiB: room comes only from lower-priority leases on "n"."""
    levels = [lvl("t", 1000, 98), lvl("org", 1000, 98)]
    full = NodeView(NodeId("n"), 100 * MiB, 98 * MiB)
    low, elsewhere = cand("low", 0, 1, 70), cand("far", 0, 9, 70, node="m")
    equal = cand("equal", 5, 9, 70)
    got = growth_victims(28 * MiB, 56 * MiB, 5, levels, full, [elsewhere, equal, low])
    assert [c.lease_id for c in got or []] == ["low"]
    assert growth_victims(28 * MiB, 56 * MiB, 5, levels, full, [elsewhere, equal]) is None
    # Two small low-priority leases, youngest first, as many as needed.
    small = [cand("s-old", 0, 1, 20), cand("s-young", 0, 2, 20), cand("s-mid", 1, 5, 30)]
    got = growth_victims(28 * MiB, 56 * MiB, 5, levels, full, small)
    assert [c.lease_id for c in got or []] == ["s-young", "s-old"]


def test_growth_victims_under_a_tenant_quota() -> None:
    """Tenant "t" is at its quota: only its own lower-priority leases make room."""
    levels = [lvl("t", 100, 98), lvl("org", 1000, 98)]
    roomy = NodeView(NodeId("n"), 1 << 40, 98 * MiB)
    other = Candidate(LeaseId("u1"), 0, 1, 70 * MiB, 0, NodeId("n"), frozenset({T("u"), T("org")}))
    assert growth_victims(28 * MiB, 56 * MiB, 5, levels, roomy, [other]) is None
    mine = cand("t1", 0, 1, 70)
    got = growth_victims(28 * MiB, 56 * MiB, 5, levels, roomy, [other, mine])
    assert [c.lease_id for c in got or []] == ["t1"]


@settings(max_examples=200, deadline=None)
@given(
    others=st.lists(
        st.tuples(st.integers(0, 6), st.integers(1, 60), st.booleans(), st.booleans()),
        max_size=12,
    ),
    quota=st.integers(60, 400),
    capacity=st.integers(60, 400),
    ask=st.integers(1, 120),
    priority=st.integers(0, 6),
)
def test_growth_victims_only_lower_priority_and_they_make_room(
    others: list[tuple[int, int, bool, bool]],
    quota: int,
    capacity: int,
    ask: int,
    priority: int,
) -> None:
    """Whatever is chosen is of lower priority and, revoked, lets the paused call (20 MiB,
    asking 20 + ``ask``) grow; None only when even every lower-priority lease would not."""
    cands = [
        Candidate(
            LeaseId(f"l{i}"),
            p,
            i,
            mib * MiB,
            0,
            NodeId("n" if here else "m"),
            frozenset({T("t" if mine else "u"), T("org")}),
        )
        for i, (p, mib, here, mine) in enumerate(others)
    ]
    mine_mib = 20 + sum(mib for _, mib, _, mine in others if mine)
    levels = [lvl("t", quota, mine_mib), lvl("org", 10_000, 20 + sum(m for _, m, _, _ in others))]
    node = NodeView(
        NodeId("n"), capacity * MiB, (20 + sum(m for _, m, here, _ in others if here)) * MiB
    )
    want = (20 + ask) * MiB
    if isinstance(decide_growth(20 * MiB, want, 0, levels, node), Grow):
        return  # fits without preemption: not asked
    chosen = growth_victims(20 * MiB, want, priority, levels, node, cands)
    lower = [c for c in cands if c.priority < priority]
    if chosen is None:
        lv, (nv,) = _without(levels, [node], lower)
        assert not isinstance(decide_growth(20 * MiB, want, 0, lv, nv), Grow) or not lower
        return
    assert all(c.priority < priority for c in chosen)
    lv, (nv,) = _without(levels, [node], chosen)
    assert isinstance(decide_growth(20 * MiB, want, 0, lv, nv), Grow)


@settings(max_examples=100, deadline=None)
@given(
    leases=st.lists(st.tuples(st.integers(1, 64), st.integers(0, 1000)), max_size=40),
    now=st.integers(0, 1200),
)
def test_expiry_always_frees(leases: list[tuple[int, int]], now: int) -> None:
    """Ending every lease ``due`` returns leaves no expired lease active and the sums equal to
    what is still active."""
    ledger = Ledger()
    ledger.load([Tenant(T("t"), 1 << 40, T("org")), Tenant(T("org"), 1 << 40)], [], [])
    for i, (mib, expires) in enumerate(leases):
        ledger.apply(
            [
                PutLease(
                    Lease(
                        LeaseId(f"l{i}"),
                        T("t"),
                        SessionName("s"),
                        "c",
                        NodeId("n"),
                        mib * MiB,
                        mib * MiB,
                        0,
                        expires,
                    )
                )
            ]
        )
    from dataclasses import replace

    for lease in ledger.due(now):
        ledger.apply([PutLease(replace(lease, state=LeaseState.EXPIRED))])
    assert all(x.expires_at_ms > now for x in ledger.leases.values())
    live = sum(mib for mib, expires in leases if expires > now) * MiB
    assert ledger.granted_bytes(T("t")) == live == ledger.granted_bytes(T("org"))
    assert ledger.active_calls(T("org")) == sum(1 for _, e in leases if e > now)
