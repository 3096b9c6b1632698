"""Hierarchical quotas per resource (memory, CPU millis, concurrent calls), any depth: the pure
policy, the ledger's subtree sums, and the admin API + `agentcg tenant` through a real broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agentcg.broker.admission import Admit, Deny, NodeView, decide_reserve
from agentcg.broker.ledger import Ledger
from agentcg.broker.model import (
    Lease,
    LeaseId,
    NodeId,
    PutLease,
    SessionName,
    Tenant,
    TenantName,
)
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import FailedPreconditionError, InvalidArgumentError, QuotaExceededError
from hypothesis import given, settings
from hypothesis import strategies as st

MiB = 1 << 20
NODES = [NodeView(NodeId("n"), 1 << 40, 0)]


def tree(*specs: tuple[str, str, int, int, int]) -> Ledger:
    """A ledger holding tenants (name, parent, memory MiB, cpu millis, max calls)."""
    ledger = Ledger()
    ledger.load(
        [
            Tenant(TenantName(n), m * MiB, TenantName(p) if p else None, cpu, calls)
            for n, p, m, cpu, calls in specs
        ],
        [],
        [],
    )
    return ledger


def grant(ledger: Ledger, tenant: str, memory_mib: int, cpu: int = 0, i: int = 0) -> None:
    ledger.apply(
        [
            PutLease(
                Lease(
                    LeaseId(f"l-{tenant}-{i}"),
                    TenantName(tenant),
                    SessionName("s"),
                    "c",
                    NodeId("n"),
                    memory_mib * MiB,
                    memory_mib * MiB,
                    0,
                    10_000,
                    cpu_millis=cpu,
                )
            )
        ]
    )


DEEP = (
    ("org", "", 1024, 4000, 4),
    ("team", "org", 512, 0, 0),
    ("proj", "team", 256, 2000, 0),
    ("agent", "proj", 1024, 0, 3),
)


@pytest.mark.parametrize(
    ("granted", "ask_mib", "ask_cpu", "code", "scope"),
    [
        ([], 64, 100, None, None),
        ([("agent", 200, 0)], 64, 0, "tenant_quota", "tenant:proj"),  # 264 > proj's 256
        ([("team", 480, 0)], 64, 0, "tenant_quota", "tenant:team"),  # a sibling used the team
        ([("agent", 10, 1990)], 1, 20, "tenant_cpu", "tenant:proj"),
        ([("org", 1, 3990)], 1, 20, "tenant_cpu", "tenant:org"),
        ([("agent", 1, 0), ("agent", 1, 0), ("agent", 1, 0)], 1, 0, "tenant_calls", "tenant:agent"),
        ([("org", 1, 0)] * 2 + [("team", 1, 0)] * 2, 1, 0, "tenant_calls", "tenant:org"),
    ],
)
def test_every_level_checks_every_resource(
    granted: list[tuple[str, int, int]], ask_mib: int, ask_cpu: int, code: str, scope: str
) -> None:
    ledger = tree(*DEEP)
    for i, (t, m, cpu) in enumerate(granted):
        grant(ledger, t, m, cpu, i)
    d = decide_reserve(
        ask_mib * MiB, ledger.quota_levels(TenantName("agent")), NODES, cpu_millis=ask_cpu
    )
    if code is None:
        assert isinstance(d, Admit)
    else:
        assert isinstance(d, Deny)
        assert (d.code, d.scope) == (code, scope)
        assert scope.split(":")[1] in d.message


@settings(max_examples=150, deadline=None)
@given(
    asks=st.lists(
        st.tuples(
            st.sampled_from(["agent", "proj", "team", "org"]),
            st.integers(1, 300),
            st.integers(0, 1500),
        ),
        max_size=40,
    )
)
def test_granted_never_exceeds_any_ancestor_quota(asks: list[tuple[str, int, int]]) -> None:
    """Admit what decide_reserve admits, in any order at any level: no level ever goes over
    any of its quotas (memory, CPU, calls), counting its whole subtree."""
    ledger = tree(*DEEP)
    for i, (t, m, cpu) in enumerate(asks):
        d = decide_reserve(m * MiB, ledger.quota_levels(TenantName(t)), NODES, cpu_millis=cpu)
        if isinstance(d, Admit):
            grant(ledger, t, m, cpu, i)
        for name, _, mem_mib, cpu_q, calls in DEEP:
            n = TenantName(name)
            assert ledger.granted_bytes(n) <= mem_mib * MiB
            assert not cpu_q or ledger.granted_cpu_millis(n) <= cpu_q
            assert not calls or ledger.active_calls(n) <= calls


def cli(broker: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", *args, "--broker", broker],
        capture_output=True,
        text=True,
        check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tenant_admin_through_the_cli_and_api(tmp_path: Path, database_url: str) -> None:
    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        b = c.broker_address
        cli(b, "tenant", "set", "org", "--memory", "1G", "--cpu", "3000", "--max-calls", "2")
        cli(b, "tenant", "set", "t", "--memory", "512M", "--parent", "org", "--weight", "3")
        out = cli(b, "tenant", "list")
        assert "org" in out and "0/3000" in out and "0/2" in out
        with SimNode(b), Client(b) as client:
            t = client.get_tenant("t")
            assert (t.parent, t.weight, t.memory_quota_bytes) == ("org", 3, 512 * MiB)
            client.reserve("t", 64 * MiB, cpu_millis=1000)
            with pytest.raises(QuotaExceededError) as cpu:
                client.reserve("t", 64 * MiB, cpu_millis=2500)
            assert "tenant org: CPU quota" in cpu.value.message
            client.reserve("t", 64 * MiB, cpu_millis=1000)
            with pytest.raises(QuotaExceededError) as calls:
                client.reserve("t", 1 * MiB)
            assert "tenant org: concurrent call limit" in calls.value.message
            org = client.get_tenant("org")
            assert (org.granted_cpu_millis, org.active_leases) == (2000, 2)
            # Bad input names the field and changes nothing.
            for kwargs, field in [
                ({"max_calls": -1}, "max_calls"),
                ({"weight": -2}, "weight"),
                ({"weight": 5000}, "weight"),
                ({"cpu_millis": -5}, "quota.cpu_millis"),
            ]:
                with pytest.raises(InvalidArgumentError) as bad:
                    client.set_tenant("t", 512 * MiB, parent="org", **kwargs)  # type: ignore[arg-type]
                assert bad.value.field == field
            assert client.get_tenant("t").weight == 3
            with pytest.raises(FailedPreconditionError):
                client.delete_tenant("org")  # has a child
        with Client(b) as client:
            client.release_batch([x.lease_id for x in client.list_leases()])
            cli(b, "tenant", "delete", "t")
            assert [x.name for x in client.list_tenants()] == ["org"]
