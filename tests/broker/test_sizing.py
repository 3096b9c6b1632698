"""Overcommit from measurements: the pure sizing rule, the node ceiling, and learning from
committed peaks through a real broker (budgets, hints, and a restart that keeps what it learned);
what was learned, read and forgotten through the Sizing service and `agentcg sizing`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from agentcg.broker.admission import Admit, Deny, NodeView, QuotaLevel, decide_reserve
from agentcg.broker.ledger import Ledger
from agentcg.broker.model import (
    ForgetPeaks,
    Lease,
    LeaseId,
    LeaseState,
    Node,
    NodeId,
    PutLease,
    PutNode,
    PutTenant,
    SessionName,
    Tenant,
    TenantName,
)
from agentcg.broker.sizing import (
    FLOOR_BYTES,
    MIN_SAMPLES,
    Profile,
    p95,
    profile,
    size_budget,
    size_session_max,
)
from agentcg.clients.cluster import LocalCluster, scrape_metric
from agentcg.clients.sdk import Client, SizingProfile
from agentcg.clients.simnode import SimNode
from agentcg.errors import InvalidArgumentError, NotFoundError, QuotaExceededError
from hypothesis import given
from hypothesis import strategies as st

MiB = 1 << 20


def test_p95_nearest_rank() -> None:
    assert p95([5]) == 5
    assert p95(list(range(1, 101))) == 95
    assert p95([1, 2, 3, 4, 100]) == 100


@pytest.mark.parametrize(
    ("intent", "peaks", "budget"),
    [
        (64 * MiB, [], 64 * MiB),  # nothing learned: the intent
        (64 * MiB, [10 * MiB] * (MIN_SAMPLES - 1), 64 * MiB),  # too few samples
        (64 * MiB, [10 * MiB] * MIN_SAMPLES, 10 * MiB),  # learned p95
        (64 * MiB, [100 * MiB] * MIN_SAMPLES, 64 * MiB),  # never above the intent
        (64 * MiB, [1 * MiB] * MIN_SAMPLES, FLOOR_BYTES),  # never below the floor
    ],
)
def test_size_budget(intent: int, peaks: list[int], budget: int) -> None:
    assert size_budget(intent, peaks) == budget


@given(intent=st.integers(1, 1 << 36), peaks=st.lists(st.integers(1, 1 << 36), max_size=80))
def test_budget_never_above_intent(intent: int, peaks: list[int]) -> None:
    assert 0 < size_budget(intent, peaks) <= intent


@pytest.mark.parametrize(
    ("peaks", "intent", "expected"),
    [
        ([], 0, Profile(0, False, 0, 0, 0, 0, 0)),
        ([], 64 * MiB, Profile(0, False, 0, 0, 0, 0, 64 * MiB)),  # nothing learned: intent
        (
            [30 * MiB, 10 * MiB, 20 * MiB],  # too few: the intent, the peaks shown anyway
            64 * MiB,
            Profile(3, False, 20 * MiB, 30 * MiB, 30 * MiB, 20 * MiB, 64 * MiB),
        ),
        (
            [10 * MiB, 12 * MiB, 14 * MiB, 16 * MiB, 40 * MiB],
            64 * MiB,
            Profile(5, True, 14 * MiB, 40 * MiB, 40 * MiB, 40 * MiB, 40 * MiB),
        ),
        (  # the budget is what size_budget grants: capped by the intent
            [10 * MiB] * 4 + [40 * MiB],
            32 * MiB,
            Profile(5, True, 10 * MiB, 40 * MiB, 40 * MiB, 40 * MiB, 32 * MiB),
        ),
    ],
)
def test_profile_sums_up_the_peaks(peaks: list[int], intent: int, expected: Profile) -> None:
    assert profile(peaks, intent) == expected


@given(intent=st.integers(1, 1 << 36), peaks=st.lists(st.integers(1, 1 << 36), max_size=80))
def test_profile_budget_is_the_granted_budget(intent: int, peaks: list[int]) -> None:
    p = profile(peaks, intent)
    assert p.budget_bytes == size_budget(intent, peaks)
    assert p.learned == (len(peaks) >= MIN_SAMPLES)
    if peaks:
        assert min(peaks) <= p.p50_bytes <= p.p95_bytes <= p.max_bytes == max(peaks)


@pytest.mark.parametrize(
    ("declared", "peaks", "maximum"),
    [
        (0, [], 0),  # nothing declared, nothing learned: undeclared
        (1024 * MiB, [100 * MiB] * (MIN_SAMPLES - 1), 1024 * MiB),  # too few: what it declared
        # learned: the p95 (of 5: the largest)
        (1024 * MiB, [100 * MiB, 120 * MiB, 150 * MiB, 110 * MiB, 130 * MiB], 150 * MiB),
        (0, [100 * MiB] * MIN_SAMPLES, 100 * MiB),  # nothing declared: what was learned
        (64 * MiB, [100 * MiB] * MIN_SAMPLES, 64 * MiB),  # never above what it declared
        (1024 * MiB, [1 * MiB] * MIN_SAMPLES, FLOOR_BYTES),  # never below the floor
    ],
)
def test_size_session_max(declared: int, peaks: list[int], maximum: int) -> None:
    assert size_session_max(declared, peaks) == maximum


def test_size_session_max_at_another_percentile() -> None:
    peaks = [50 * MiB, 10 * MiB, 40 * MiB, 20 * MiB, 30 * MiB]
    assert size_session_max(1 << 30, peaks, 50) == 30 * MiB  # nearest rank: the 3rd of 5
    assert size_session_max(1 << 30, peaks, 95) == 50 * MiB
    assert size_session_max(25 * MiB, peaks, 50) == 25 * MiB  # never above what was declared


@given(declared=st.integers(0, 1 << 36), peaks=st.lists(st.integers(1, 1 << 36), max_size=80))
def test_session_max_never_above_what_was_declared(declared: int, peaks: list[int]) -> None:
    got = size_session_max(declared, peaks)
    if declared:
        assert 0 < got <= declared
    if len(peaks) < MIN_SAMPLES:
        assert got == declared
    else:
        assert got >= min(declared or FLOOR_BYTES, FLOOR_BYTES)


def test_a_session_peak_is_the_most_it_held_at_once() -> None:
    """The ledger keeps the most a declared session of a class held at once, across its last
    lease being renewed or grown (which drops and puts back its claim), and hands it out only for
    the lease whose end ends the session."""
    ledger = Ledger()
    org, team = TenantName("org"), TenantName("team")
    ledger.apply(
        [
            PutTenant(Tenant(org, 1 << 40)),
            PutTenant(Tenant(team, 1 << 40, parent=org)),
            PutNode(Node(NodeId("n"), "127.0.0.1:1", 1 << 34, 0, 0)),
        ]
    )

    def lease(i: int, mib: int, expires_ms: int = 1_000) -> Lease:
        return Lease(
            lease_id=LeaseId(f"l{i}"),
            tenant=team,
            session=SessionName("s"),
            command_class="c",
            node_id=NodeId("n"),
            memory_bytes=mib * MiB,
            intent_memory_bytes=mib * MiB,
            granted_at_ms=0,
            expires_at_ms=expires_ms,
            session_max_memory_bytes=1 << 30,
            session_class="agent",
        )

    base, call = lease(1, 100), lease(2, 50)
    ledger.apply([PutLease(base), PutLease(call)])
    assert ledger.session_end_peak(base) == 0  # not its last lease
    ledger.apply([PutLease(_ended(call))])
    assert ledger.session_end_peak(base) == 150 * MiB
    ledger.apply([PutLease(lease(1, 100, expires_ms=9_000))])  # renewed
    ledger.apply([PutLease(lease(1, 120, expires_ms=9_000))])  # grown, still under 150
    assert ledger.session_end_peak(ledger.leases[LeaseId("l1")]) == 150 * MiB
    last = _ended(ledger.leases[LeaseId("l1")], session_peak_bytes=150 * MiB)
    ledger.apply([PutLease(last)])
    assert ledger.session_end_peak(last) == 0  # ended: nothing left to end
    # Learned under the organization (the tenant's top-level ancestor), by class.
    assert ledger.recent_session_peaks(team, "agent") == (150 * MiB,)
    assert ledger.recent_session_peaks(org, "agent") == (150 * MiB,)
    assert ledger.recent_session_peaks(team, "other") == ()
    # A new session of the same name starts its count afresh.
    again = lease(3, 10)
    ledger.apply([PutLease(again)])
    assert ledger.session_end_peak(again) == 10 * MiB


def _ended(x: Lease, session_peak_bytes: int = 0) -> Lease:
    return dataclasses.replace(
        x, state=LeaseState.RELEASED, ended_at_ms=1, session_peak_bytes=session_peak_bytes
    )


def test_forgetting_is_undone_with_what_was_learned_since() -> None:
    """A ForgetPeaks whose commit fails is undone: the peaks come back, and one committed in
    between (another lease ended) is kept after them."""
    ledger = Ledger()
    t = TenantName("t")
    for i, peak in enumerate((10, 20, 30)):
        ledger.observe_peak(t, "pytest", peak * MiB)
        ledger.observe_peak(t, "pip", i + 1)
    undo = ledger.apply([ForgetPeaks(t, "pytest", 100)])
    assert ledger.recent_peaks(t, "pytest") == ()
    assert ledger.recent_peaks(t, "pip") == (1, 2, 3)  # another class untouched
    ledger.observe_peak(t, "pytest", 99 * MiB)
    ledger.apply(undo)
    assert ledger.recent_peaks(t, "pytest") == (10 * MiB, 20 * MiB, 30 * MiB, 99 * MiB)


def test_forgetting_a_session_class_is_undone_too() -> None:
    """ForgetPeaks with ``sessions`` forgets an organization's session class, not a command
    class of the same name, and its undo brings the sessions back likewise."""
    ledger = Ledger()
    org = TenantName("org")
    ledger.load([Tenant(org, 1 << 30), Tenant(TenantName("team"), 1 << 30, parent=org)], [], [])
    for peak in (10, 20):
        ledger.observe_session_peak(TenantName("team"), "agent", peak * MiB)
    ledger.observe_peak(org, "agent", 5)
    undo = ledger.apply([ForgetPeaks(org, "agent", 100, sessions=True)])
    assert ledger.recent_session_peaks(TenantName("team"), "agent") == ()
    assert ledger.recent_peaks(org, "agent") == (5,)  # the command class of that name
    ledger.observe_session_peak(TenantName("team"), "agent", 99 * MiB)
    ledger.apply(undo)
    assert ledger.recent_session_peaks(org, "agent") == (10 * MiB, 20 * MiB, 99 * MiB)


def test_overcommit_ceiling_bounds_declared_intent() -> None:
    levels = [QuotaLevel(Tenant(TenantName("t"), 1 << 40), 0)]
    node = NodeView(
        NodeId("n"),
        1024 * MiB,
        100 * MiB,
        intent_memory_bytes=1400 * MiB,
        overcommit_ceiling_bytes=1536 * MiB,
    )
    assert isinstance(decide_reserve(32 * MiB, levels, [node], intent_bytes=128 * MiB), Admit)
    d = decide_reserve(32 * MiB, levels, [node], intent_bytes=256 * MiB)
    assert isinstance(d, Deny) and d.code == "node_overcommit"
    assert d.largest_memory_bytes_available == 136 * MiB


def test_learns_from_committed_peaks_and_hints_denials(tmp_path: Path, database_url: str) -> None:
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    with cluster:
        with (
            SimNode(cluster.broker_address, memory_bytes=1 << 34) as node,
            Client(cluster.broker_address) as c,
        ):
            c.set_tenant("t", 256 * MiB)
            for _ in range(MIN_SAMPLES):
                lease = c.reserve("t", 64 * MiB, command_class="pytest")
                assert lease.memory_bytes == 64 * MiB
                c.release(lease.lease_id, peak_bytes=12 * MiB, outcome="completed")
            sized = c.reserve("t", 64 * MiB, command_class="pytest")
            assert sized.memory_bytes == 12 * MiB  # the learned p95, not the intent
            other = c.reserve("t", 64 * MiB, command_class="pip")
            assert other.memory_bytes == 64 * MiB  # another class learned nothing
            filler = c.reserve("t", 176 * MiB, command_class="pip")  # 4 MiB left
            with pytest.raises(QuotaExceededError) as denied:
                c.reserve("t", 64 * MiB, command_class="pytest")
            hint = denied.value
            assert hint.last_peak_memory_bytes == 12 * MiB
            assert hint.largest_memory_bytes_available == 4 * MiB
            assert hint.retry_after_ms > 0
            c.release_batch([sized.lease_id, other.lease_id, filler.lease_id])
            # A restarted broker sizes from what the database holds.
            cluster.stop("broker")
            node.address = cluster.start_broker()
            assert node.connected.wait(30)
            with Client(cluster.broker_address) as again:
                assert again.reserve("t", 64 * MiB, command_class="pytest").memory_bytes == 12 * MiB


def test_sessions_of_a_class_are_declared_at_what_they_held(
    tmp_path: Path, database_url: str
) -> None:
    """Sessions that declare only a sandbox limit (1 GiB) with a class: on a 1 GiB node (its
    overcommit ceiling 1.5x) one such session fits at a time. Once five sessions of the class
    have ended in the organization (at most 100-150 MiB held at once, calls released one by one
    or in a batch), a new one is declared at their p95, 150 MiB; then six in another tenant of
    it start at once; one goes past it (raised while safe). Another class, and the same class in
    another organization, still get what they declared; a class that is not a name is refused.
    A restarted broker sizes from the sessions the database holds."""
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    GiB = 1 << 30

    def start(c: Client, tenant: str, session: str, mib: int, session_class: str = "agent") -> str:
        lease = c.reserve(
            tenant,
            mib * MiB,
            session=session,
            session_max_bytes=GiB,
            session_class=session_class,
            ttl_ms=600_000,
        )
        return str(lease.lease_id)

    def declared(c: Client, n: int) -> list[int]:
        """The session maxima of the newest ``n`` grants, oldest first."""
        records = c.list_audit(kind="reserve", limit=n).records
        return [int(r.detail["session_max_bytes"]) // MiB for r in reversed(records)]

    with cluster, SimNode(cluster.broker_address, memory_bytes=GiB) as node:
        with Client(cluster.broker_address) as c:
            c.set_tenant("org", 8 * GiB)
            c.set_tenant("a", 4 * GiB, parent="org")
            c.set_tenant("b", 4 * GiB, parent="org")
            c.set_tenant("z", 4 * GiB)
            first = start(c, "a", "x", 100)
            with pytest.raises(QuotaExceededError):  # 2 GiB declared over a 1.5 GiB ceiling
                start(c, "b", "y", 100)
            c.release(first)
            for i, call_mib in enumerate([20, 50, 30, 50, 40]):
                base = start(c, "a", f"s{i}", 100)
                call = start(c, "a", f"s{i}", call_mib)
                if i % 2:
                    c.release(call)
                    c.release(base)
                else:
                    c.release_batch([call, base])
            # Until five sessions (x and s0-s3) ended, what they declared; then the p95.
            assert declared(c, 10) == [1024] * 8 + [150] * 2
            held = [start(c, "b", f"t{i}", 100) for i in range(6)]
            assert declared(c, 6) == [150] * 6
            held.append(start(c, "b", "t0", 100))  # t0 past its 150 MiB: still safe
            (learned,) = c.list_session_sizing(tenant="b", intent_memory_bytes=GiB)
            assert (learned.tenant, learned.command_class, learned.samples) == ("org", "agent", 6)
            assert (learned.p95_bytes, learned.budget_bytes) == (150 * MiB, 150 * MiB)
            assert c.list_session_sizing(tenant="z") == []  # another organization
            for tenant, session_class in (("b", "tests"), ("z", "agent")):
                with pytest.raises(QuotaExceededError) as denied:
                    start(c, tenant, "u", 100, session_class)
                assert "overcommit" in denied.value.message
            # A class that could not be a name: refused, naming the field; nothing granted.
            for bad in ("../etc", "a b", "x" * 300):
                with pytest.raises(InvalidArgumentError) as refused:
                    start(c, "b", "w", 100, bad)
                assert refused.value.field == "session_class"
            assert len(c.list_leases()) == len(held)
            c.release_batch(held)
        cluster.stop("broker")
        node.address = cluster.start_broker()
        assert node.connected.wait(30)
        with Client(cluster.broker_address) as c:
            # The 11 sessions ended (t0 held 200 MiB at most, t1-t5 100 MiB): their p95.
            start(c, "b", "v", 100)
            assert declared(c, 1) == [200]


def test_the_session_percentile_is_the_brokers_to_set(tmp_path: Path) -> None:
    """``agentcg broker --session-percentile 50``: sessions that held 10-50 MiB at most make
    the next one declared at their median, 30 MiB, as ``list_session_sizing`` says."""
    flags = ("--session-percentile", "50")
    with (
        LocalCluster(tmp_path, nodes=0, broker_args=flags, log_level="WARNING") as cl,
        SimNode(cl.broker_address, memory_bytes=1 << 34),
        Client(cl.broker_address) as c,
    ):
        c.set_tenant("t", 1 << 30)
        for i, mib in enumerate([50, 10, 40, 20, 30, 25]):
            lease = c.reserve(
                "t", mib * MiB, session=f"s{i}", session_max_bytes=1 << 30, session_class="agent"
            )
            c.release(lease.lease_id)
        (entry, *_) = c.list_audit(kind="reserve").records  # the newest: s5
        assert entry.detail["session_max_bytes"] == 30 * MiB
        (learned,) = c.list_session_sizing(intent_memory_bytes=1 << 30)
        assert (learned.samples, learned.budget_bytes) == (6, 25 * MiB)  # the 3rd of 6 now


def test_forgetting_a_session_class_outlives_a_restart(tmp_path: Path, database_url: str) -> None:
    """``forget_session_sizing``: an organization's session class, then every one of it. New
    sessions of a forgotten class are declared at what they declare; the other classes and
    organizations keep what they learned; a restarted broker learns only from sessions that
    ended after the forget. Bad requests name the field and change nothing."""
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    GiB = 1 << 30

    def sessions(c: Client, tenant: str, session_class: str, mibs: list[int]) -> None:
        for mib in mibs:
            lease = c.reserve(
                tenant,
                mib * MiB,
                session=f"{session_class}-{uuid.uuid4().hex[:8]}",
                session_max_bytes=GiB,
                session_class=session_class,
            )
            c.release(lease.lease_id)

    def learned(c: Client) -> dict[tuple[str, str], int]:
        return {(p.tenant, p.command_class): p.samples for p in c.list_session_sizing()}

    def declared(c: Client) -> int:
        """The session maximum of the newest grant, in MiB."""
        (entry, *_) = c.list_audit(kind="reserve").records
        return int(entry.detail["session_max_bytes"]) // MiB

    with cluster, SimNode(cluster.broker_address, memory_bytes=1 << 34) as node:
        with Client(cluster.broker_address) as c:
            c.set_tenant("org", 8 * GiB)
            c.set_tenant("a", 4 * GiB, parent="org")
            c.set_tenant("b", 4 * GiB, parent="org")
            c.set_tenant("z", 4 * GiB)
            sessions(c, "a", "agent", [40] * MIN_SAMPLES)
            sessions(c, "b", "tests", [20] * MIN_SAMPLES)
            sessions(c, "z", "agent", [30] * MIN_SAMPLES)
            _learn(c, "org", "agent", [12] * MIN_SAMPLES)  # a command class of that name
            before = learned(c)
            audited = len(c.list_audit().records)
            bad = [
                (lambda: c.forget_session_sizing(""), "organization"),
                (lambda: c.forget_session_sizing("../etc"), "organization"),
                (lambda: c.forget_session_sizing("a"), "organization"),  # under org
                (lambda: c.forget_session_sizing("org", "a b"), "session_class"),
            ]
            for call, field in bad:
                with pytest.raises(InvalidArgumentError) as refused:
                    call()
                assert refused.value.field == field
            with pytest.raises(NotFoundError, match="nobody"):
                c.forget_session_sizing("nobody")
            assert learned(c) == before
            assert len(c.list_audit().records) == audited

            forgotten = c.forget_session_sizing("org", "agent")
            assert [(p.tenant, p.command_class, p.samples, p.p95_bytes) for p in forgotten] == [
                ("org", "agent", MIN_SAMPLES, 40 * MiB)
            ]
            assert learned(c) == {("org", "tests"): MIN_SAMPLES, ("z", "agent"): MIN_SAMPLES}
            assert [p.command_class for p in c.list_sizing(tenant="org")] == ["agent"]
            sessions(c, "a", "agent", [100])  # declared at what it declares again
            assert declared(c) == 1024
            sessions(c, "z", "agent", [10])  # another organization: still learned
            assert declared(c) == 30
            assert c.forget_session_sizing("org", "agent")[0].samples == 1  # the one since
            sessions(c, "b", "agent", [60])
            entries = c.list_audit(kind="sizing_forget").records
            assert [(r.tenant, r.detail["session_class"]) for r in entries] == [
                ("org", "agent")
            ] * 2
        cluster.stop("broker")
        node.address = cluster.start_broker()
        assert node.connected.wait(30)
        with Client(cluster.broker_address) as c:
            # The sessions are all in the database: the restarted broker learns from those
            # that ended after the last forget of their class (b's 60 MiB one) only.
            assert learned(c) == {
                ("org", "agent"): 1,
                ("org", "tests"): MIN_SAMPLES,
                ("z", "agent"): MIN_SAMPLES + 1,
            }
            # Every session class of the organization.
            assert [p.command_class for p in c.forget_session_sizing("org")] == ["agent", "tests"]
            assert [p.command_class for p in c.list_sizing(tenant="org")] == ["agent"]
        cluster.stop("broker")
        node.address = cluster.start_broker()
        assert node.connected.wait(30)
        with Client(cluster.broker_address) as c:
            assert learned(c) == {("z", "agent"): MIN_SAMPLES + 1}


def _learn(c: Client, tenant: str, command_class: str, peaks_mib: list[int]) -> None:
    leases = [c.reserve(tenant, 64 * MiB, command_class=command_class) for _ in peaks_mib]
    for lease, peak in zip(leases, peaks_mib, strict=True):
        c.release(lease.lease_id, peak_bytes=peak * MiB, outcome="completed")


def test_profiles_show_what_sizing_grants(tmp_path: Path, database_url: str) -> None:
    flags = ("--metrics-listen", "127.0.0.1:0")
    with (
        LocalCluster(
            tmp_path, nodes=0, database_url=database_url, broker_args=flags, log_level="WARNING"
        ) as cl,
        SimNode(cl.broker_address, memory_bytes=1 << 34),
        Client(cl.broker_address) as c,
    ):
        c.set_tenant("org", 1 << 30)
        c.set_tenant("team-a", 512 * MiB, parent="org")
        c.set_tenant("team-b", 512 * MiB, parent="org")
        _learn(c, "team-a", "pytest", [10, 12, 14, 16, 40])
        _learn(c, "team-a", "pip", [30, 20])
        _learn(c, "team-b", "pytest", [8] * MIN_SAMPLES)
        profiles = c.list_sizing(intent_memory_bytes=64 * MiB)
        assert [(p.tenant, p.command_class) for p in profiles] == [
            ("team-a", "pip"),
            ("team-a", "pytest"),
            ("team-b", "pytest"),
        ]
        pip, pytest_a, pytest_b = profiles
        assert pytest_a == SizingProfile(
            "team-a", "pytest", 5, True, 14 * MiB, 40 * MiB, 40 * MiB, 40 * MiB, 40 * MiB
        )
        assert pip == SizingProfile(
            "team-a", "pip", 2, False, 20 * MiB, 30 * MiB, 30 * MiB, 20 * MiB, 64 * MiB
        )
        assert pytest_b.budget_bytes == 8 * MiB
        # What the profile says a Reserve gets is what it gets; the gauges show what the
        # active leases declared and what they were granted.
        leases = [c.reserve(p.tenant, 64 * MiB, command_class=p.command_class) for p in profiles]
        assert [x.memory_bytes for x in leases] == [p.budget_bytes for p in profiles]
        metrics = cl.metrics_address("broker")
        assert scrape_metric(metrics, "agentcg_broker_declared_memory_bytes") == 3 * 64 * MiB
        assert scrape_metric(metrics, "agentcg_broker_granted_memory_bytes") == (64 + 40 + 8) * MiB
        c.release_batch([x.lease_id for x in leases])  # no peak: nothing learned
        assert scrape_metric(metrics, "agentcg_broker_granted_memory_bytes") == 0
        assert c.list_sizing(intent_memory_bytes=64 * MiB) == profiles
        # Filters: a subtree, one tenant, one class; no intent, no budget.
        assert len(c.list_sizing(tenant="org")) == 3
        assert [p.command_class for p in c.list_sizing(tenant="team-a")] == ["pip", "pytest"]
        assert [p.tenant for p in c.list_sizing(command_class="pytest")] == ["team-a", "team-b"]
        assert {p.budget_bytes for p in c.list_sizing()} == {0}
        assert c.list_sizing(tenant="team-a", command_class="make") == []


def test_forgetting_a_class_outlives_a_restart(tmp_path: Path, database_url: str) -> None:
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    with cluster, SimNode(cluster.broker_address, memory_bytes=1 << 34) as node:
        with Client(cluster.broker_address) as c:
            c.set_tenant("t", 1 << 30)
            _learn(c, "t", "pytest", [12] * MIN_SAMPLES)
            _learn(c, "t", "pip", [20] * MIN_SAMPLES)
            forgotten = c.forget_sizing("t", "pytest")
            assert [(p.command_class, p.samples, p.p95_bytes) for p in forgotten] == [
                ("pytest", MIN_SAMPLES, 12 * MiB)
            ]
            assert [p.command_class for p in c.list_sizing()] == ["pip"]
            assert c.reserve("t", 64 * MiB, command_class="pytest").memory_bytes == 64 * MiB
            assert c.forget_sizing("t", "pytest")[0].samples == 0  # again: nothing left
            entries = c.list_audit(kind="sizing_forget").records
            assert [(r.tenant, r.detail["command_class"]) for r in entries] == [
                ("t", "pytest"),
                ("t", "pytest"),
            ]
        cluster.stop("broker")
        node.address = cluster.start_broker()
        assert node.connected.wait(30)
        with Client(cluster.broker_address) as c:
            # The ended leases are still in the database; the restarted broker does not
            # learn from the forgotten ones, and does from the other class's.
            assert {p.command_class: p.samples for p in c.list_sizing()} == {"pip": MIN_SAMPLES}
            assert c.reserve("t", 64 * MiB, command_class="pytest").memory_bytes == 64 * MiB
            assert c.reserve("t", 64 * MiB, command_class="pip").memory_bytes == 20 * MiB
            # Peaks committed after the forget are learned from, before and after a restart.
            _learn(c, "t", "pytest", [30] * MIN_SAMPLES)
            assert c.reserve("t", 64 * MiB, command_class="pytest").memory_bytes == 30 * MiB
            # Forgetting every class of the tenant.
            assert [p.command_class for p in c.forget_sizing("t")] == ["pip", "pytest"]
            assert c.list_sizing() == []
            _learn(c, "t", "make", [16] * MIN_SAMPLES)
        cluster.stop("broker")
        node.address = cluster.start_broker()
        assert node.connected.wait(30)
        with Client(cluster.broker_address) as c:
            assert {p.command_class: p.samples for p in c.list_sizing()} == {"make": MIN_SAMPLES}


def test_bad_sizing_requests_name_the_field_and_change_nothing(
    tmp_path: Path, database_url: str
) -> None:
    with (
        LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as cl,
        SimNode(cl.broker_address, memory_bytes=1 << 34),
        Client(cl.broker_address) as c,
    ):
        c.set_tenant("t", 1 << 30)
        _learn(c, "t", "pytest", [12] * MIN_SAMPLES)
        before = c.list_sizing()
        bad = [
            (lambda: c.list_sizing(tenant="../etc"), "tenant"),
            (lambda: c.list_sizing(command_class="a b"), "command_class"),
            (lambda: c.list_sizing(intent_memory_bytes=-1), "intent_memory_bytes"),
            (lambda: c.forget_sizing(""), "tenant"),
            (lambda: c.forget_sizing("t", "x" * 300), "command_class"),
        ]
        for call, field in bad:
            with pytest.raises(InvalidArgumentError) as exc:
                call()
            assert exc.value.field == field
        with pytest.raises(NotFoundError, match="nobody"):
            c.forget_sizing("nobody")
        assert c.list_sizing() == before
        assert not c.list_audit(kind="sizing_forget").records
        assert cl.procs["broker"].poll() is None


def test_sizing_cli(tmp_path: Path) -> None:
    with (
        LocalCluster(tmp_path, nodes=0, log_level="WARNING") as cl,
        SimNode(cl.broker_address, memory_bytes=1 << 34),
        Client(cl.broker_address) as c,
    ):
        c.set_tenant("t", 1 << 30)
        _learn(c, "t", "pytest", [12] * MIN_SAMPLES)
        for i in range(MIN_SAMPLES):  # sessions of a class, each 30 MiB at most
            lease = c.reserve(
                "t", 30 * MiB, session=f"s{i}", session_max_bytes=1 << 30, session_class="agent"
            )
            c.release(lease.lease_id)

        def agentcg(*args: str) -> str:
            cmd = [sys.executable, "-m", "agentcg.clients.cli", *args]
            cmd += ["--broker", cl.broker_address]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        listed = json.loads(agentcg("sizing", "list", "--intent", "1G", "--json"))
        assert listed == {
            "profiles": [
                {
                    "tenant": "t",
                    "command_class": "pytest",
                    "samples": MIN_SAMPLES,
                    "learned": True,
                    "p50_bytes": 12 * MiB,
                    "p95_bytes": 12 * MiB,
                    "max_bytes": 12 * MiB,
                    "last_peak_bytes": 12 * MiB,
                    "budget_bytes": 12 * MiB,
                }
            ],
            "sessions": [
                {
                    "tenant": "t",  # the organization: t is a top-level tenant
                    "command_class": "agent",
                    "samples": MIN_SAMPLES,
                    "learned": True,
                    "p50_bytes": 30 * MiB,
                    "p95_bytes": 30 * MiB,
                    "max_bytes": 30 * MiB,
                    "last_peak_bytes": 30 * MiB,
                    "budget_bytes": 30 * MiB,  # the maximum a session declaring 1 GiB gets
                }
            ],
        }
        table = agentcg("sizing", "list", "--tenant", "t")
        assert "pytest" in table and "p95" in table
        assert "session classes" in table and "agent" in table
        assert "forgot 5 peaks" in agentcg("sizing", "forget", "t", "--class", "pytest")
        assert c.list_sizing() == []
        assert len(c.list_session_sizing()) == 1  # the session classes are not touched
        out = agentcg("sizing", "forget-sessions", "t", "--class", "agent")
        assert "session class agent: forgot 5 sessions (p95 30.0 MiB)" in out, out
        assert c.list_session_sizing() == []
        assert "nothing learned to forget" in agentcg("sizing", "forget-sessions", "t")
