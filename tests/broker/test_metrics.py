"""The broker's metrics module on a private registry: what each hook counts, the live-state
gauges read at scrape time (bounded per-org labels), and the journal's commit metrics against a
real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from agentcg.broker.journal import Journal
from agentcg.broker.ledger import Ledger
from agentcg.broker.metrics import BrokerMetrics, BrokerState, ReserveOutcome
from agentcg.broker.model import (
    Lease,
    LeaseId,
    Node,
    NodeId,
    PutTenant,
    SessionName,
    Tenant,
    TenantName,
)
from agentcg.broker.service import BrokerCore
from agentcg.broker.store import Store
from prometheus_client import CollectorRegistry, generate_latest

MiB = 1 << 20


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_reserve_outcomes_are_counted_per_rpc_and_admission_latency_observed() -> None:
    m = BrokerMetrics()
    r = m.registry
    m.reserve("Reserve", ReserveOutcome.GRANTED)
    m.reserve("Reserve", ReserveOutcome.GRANTED)
    m.reserve("Reserve", ReserveOutcome.TIMED_OUT)
    m.reserve("ReserveBatch", ReserveOutcome.DENIED, 5)
    m.admission("Reserve", "granted", 0.0004)
    m.admission("Reserve", "granted", 0.003)
    m.admission("ReserveBatch", "answered", 0.002)
    total = "agentcg_broker_reserve_total"
    assert value(r, total, rpc="Reserve", outcome="granted") == 2
    assert value(r, total, rpc="Reserve", outcome="timed_out") == 1
    assert value(r, total, rpc="ReserveBatch", outcome="denied") == 5
    # Every outcome has its series from the start (rate() works from the first ask on).
    assert value(r, total, rpc="Reserve", outcome="invalid_argument") == 0
    hist = "agentcg_broker_admission_seconds"
    assert value(r, hist + "_count", rpc="Reserve", outcome="granted") == 2
    assert value(r, hist + "_bucket", rpc="Reserve", outcome="granted", le="0.0005") == 1
    assert value(r, hist + "_bucket", rpc="Reserve", outcome="granted", le="0.005") == 2
    assert value(r, hist + "_count", rpc="ReserveBatch", outcome="answered") == 1
    # Histograms exist only for outcomes that happened.
    assert value(r, hist + "_count", rpc="Reserve", outcome="denied") is None


def test_node_stream_counters_by_kind() -> None:
    m = BrokerMetrics()
    r = m.registry
    m.pressure_event("limit_reached")
    m.pressure_event("node")
    m.pressure_event("")  # a kind this broker does not know
    m.decision_sent("grow")
    m.decision_sent("preempt")
    m.decision_sent("preempt")
    m.lease_expiries.inc()
    assert value(r, "agentcg_broker_pressure_events_total", kind="limit_reached") == 1
    assert value(r, "agentcg_broker_pressure_events_total", kind="node") == 1
    assert value(r, "agentcg_broker_pressure_events_total", kind="unspecified") == 1
    assert value(r, "agentcg_broker_pressure_events_total", kind="oom_kill") == 0
    assert value(r, "agentcg_broker_decisions_total", kind="grow") == 1
    assert value(r, "agentcg_broker_decisions_total", kind="preempt") == 2
    assert value(r, "agentcg_broker_decisions_total", kind="kill") == 0
    assert value(r, "agentcg_broker_lease_expiries_total") == 1


def test_wal_size_is_read_at_each_scrape(tmp_path: Path) -> None:
    m = BrokerMetrics()
    wal = tmp_path / "broker.db-wal"
    m.track_wal(wal)
    assert value(m.registry, "agentcg_broker_db_wal_bytes") == 0  # no WAL yet
    wal.write_bytes(b"x" * 5000)
    assert value(m.registry, "agentcg_broker_db_wal_bytes") == 5000


def test_state_gauges_are_read_at_each_scrape() -> None:
    m = BrokerMetrics()
    reads: list[int] = []
    state = BrokerState(
        active_leases=3,
        queue_waiters=2,
        nodes_registered=4,
        node_streams=3,
        nodes_pressured=1,
        tenants=7,
        nodes_cordoned=2,
        granted_memory_bytes=96 * MiB,
        declared_memory_bytes=256 * MiB,
        org_active_leases={"acme": 3, "_other": 0},
        org_granted_bytes={"acme": 96 * MiB, "_other": 0},
    )

    def read() -> BrokerState:
        reads.append(1)
        return state

    m.track_state(read)
    # Registering describes the collector without reading: the broker registers it on its event
    # loop, and ``read`` runs on that loop (a read there stalled every start for 2 s).
    assert reads == []
    r = m.registry
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        m.track_state(read)  # the described names still guard against a second registration
    assert value(r, "agentcg_broker_active_leases") == 3
    assert len(reads) == 1
    text = generate_latest(r).decode()
    assert len(reads) == 2
    assert "agentcg_broker_queue_waiters 2.0" in text
    assert 'agentcg_broker_org_active_leases{org="acme"} 3.0' in text
    assert 'agentcg_broker_org_granted_memory_bytes{org="acme"} 1.00663296e+08' in text
    assert value(r, "agentcg_broker_node_streams") == 3
    assert value(r, "agentcg_broker_nodes_pressured") == 1
    assert value(r, "agentcg_broker_nodes_cordoned") == 2
    assert value(r, "agentcg_broker_granted_memory_bytes") == 96 * MiB
    assert value(r, "agentcg_broker_declared_memory_bytes") == 256 * MiB


def test_state_gauges_are_left_out_when_the_state_cannot_be_read() -> None:
    m = BrokerMetrics()
    m.track_state(lambda: None)
    text = generate_latest(m.registry).decode()
    assert "agentcg_broker_active_leases" not in text
    assert "agentcg_broker_reserve_total" in text  # the rest is still served


def lease(n: int, tenant: str, memory: int) -> Lease:
    return Lease(
        lease_id=LeaseId(f"l{n:04d}"),
        tenant=TenantName(tenant),
        session=SessionName("s"),
        command_class="c",
        node_id=NodeId("n1"),
        memory_bytes=memory,
        intent_memory_bytes=memory,
        granted_at_ms=0,
        expires_at_ms=10**13,
    )


@pytest.fixture
def store(tmp_path: Path):
    store = Store(Store.default_url(tmp_path))
    store.migrate()
    yield store
    store.close()


def test_core_state_counts_leases_per_org_with_a_bounded_label_set(store: Store) -> None:
    ledger = Ledger()
    orgs = [Tenant(TenantName(f"org{i}"), 1 << 40) for i in range(5)]
    teams = [
        Tenant(TenantName(f"team{i}"), 1 << 30, parent=TenantName(f"org{i}")) for i in range(5)
    ]
    leases = [lease(i, f"team{i % 5}", MiB) for i in range(5)]  # one per org ...
    leases += [lease(10 + i, "team3", 2 * MiB) for i in range(3)]  # ... and 3 more in org3
    leases += [lease(20 + i, "org1", MiB) for i in range(2)]  # ... 2 more in org1, directly
    ledger.load(
        orgs + teams,
        [Node(NodeId("n1"), "127.0.0.1:1", 1 << 40, 0, 0)],
        leases,
    )
    core = BrokerCore(store, Journal(store), ledger)
    full = core.state()
    assert full.active_leases == 10
    assert full.tenants == 10 and full.nodes_registered == 1 and full.node_streams == 0
    assert full.org_active_leases == {"org0": 1, "org1": 3, "org2": 1, "org3": 4, "org4": 1}
    assert full.org_granted_bytes["org3"] == 7 * MiB
    bounded = core.state(max_orgs=2)  # the two busiest keep their own series
    assert bounded.org_active_leases == {"org3": 4, "org1": 3, "_other": 3}
    assert bounded.org_granted_bytes == {"org3": 7 * MiB, "org1": 3 * MiB, "_other": 3 * MiB}


def test_journal_observes_each_group_commit(store: Store) -> None:
    metrics = BrokerMetrics()
    r = metrics.registry

    async def go() -> None:
        journal = Journal(store, metrics=metrics)
        journal.start()
        try:
            # Three decisions in one loop round: one commit of three.
            await asyncio.gather(
                *(
                    journal.submit([PutTenant(Tenant(TenantName(f"t{i}"), 1 << 30))])
                    for i in range(3)
                )
            )
            await journal.commit([PutTenant(Tenant(TenantName("t9"), 1 << 30))])
        finally:
            await journal.close()

    asyncio.run(go())
    assert value(r, "agentcg_broker_journal_commit_seconds_count") == 2
    assert value(r, "agentcg_broker_journal_commit_decisions_count") == 2
    assert value(r, "agentcg_broker_journal_commit_decisions_sum") == 4
    assert value(r, "agentcg_broker_journal_commit_decisions_bucket", le="2.0") == 1
    assert value(r, "agentcg_broker_journal_commit_failures_total") == 0
