"""Crash safety: SIGKILL the broker process in the middle of concurrent Reserve/Release load,
restart it on the same database, and check from the database that

- no acknowledged grant (or release) was lost;
- at every level of the quota tree the sum of active grants never exceeded its quota, replaying
  the audit trail in commit order;
- clients recover: a retried Reserve with the same idempotency key gets the same lease.

Runs on SQLite and on PostgreSQL (see conftest.database_url).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from agentcg.broker.store import Store
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import AsyncClient, Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import AgentcgError, QuotaExceededError

MiB = 1 << 20
LEASE = 8 * MiB
# org (160 MiB) > team-a (96 MiB) > {a1, a2} (64 MiB each); org > b (64 MiB): the children
# over-subscribe their parents, so every level denies some of the load.
TREE = [("org", "", 160), ("team-a", "org", 96), ("a1", "team-a", 64), ("a2", "team-a", 64)]
TREE += [("b", "org", 64)]
LEAVES = ["a1", "a2", "b"]


class Load:
    """Workers that reserve (with an idempotency key) and release, recording what was acked."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.acked: dict[str, str] = {}  # idempotency key -> lease id
        self.released: set[str] = set()  # lease ids whose release was acked
        self.unknown: dict[str, str] = {}  # key -> tenant: Reserve sent, no answer
        self.stop = threading.Event()
        self.started = threading.Event()

    async def worker(self, w: int) -> None:
        async with AsyncClient(self.address, timeout_s=5) as c:
            i = 0
            mine: list[str] = []
            while not self.stop.is_set():
                tenant = LEAVES[(w + i) % len(LEAVES)]
                key = f"w{w}-{i}"
                i += 1
                try:
                    lease = await c.reserve(tenant, LEASE, idempotency_key=key)
                except QuotaExceededError:
                    # Denied: free something of ours and go on.
                    if mine:
                        lid = mine.pop(0)
                        try:
                            await c.release(lid)
                        except AgentcgError:
                            return
                        self.released.add(lid)
                    continue
                except AgentcgError:
                    self.unknown[key] = tenant
                    return
                self.acked[key] = lease.lease_id
                mine.append(lease.lease_id)
                self.started.set()

    def run(self, workers: int) -> threading.Thread:
        async def main() -> None:
            await asyncio.gather(*(self.worker(w) for w in range(workers)))

        t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        t.start()
        return t


def audit_replay(store: Store) -> dict[str, int]:
    """Replay reserve/release/expire/grow in commit order; return the peak sum per tenant's
    subtree (its own leases and its descendants')."""
    parents = {name: parent for name, parent, _ in TREE}

    def chain(t: str) -> list[str]:
        out = []
        cur: str | None = t
        while cur:
            out.append(cur)
            cur = parents.get(cur) or None
        return out

    budgets: dict[str, int] = {}
    tenant_of: dict[str, str] = {}
    for lease in store.list_leases(include_inactive=True, limit=1_000_000):
        tenant_of[lease.lease_id] = lease.tenant
    granted: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for entry in store.audit(limit=1_000_000):
        if entry.kind == "reserve":
            amount = json.loads(entry.detail)["memory_bytes"]
            budgets[entry.lease_id] = amount
            delta = amount
        elif entry.kind in ("release", "expire", "revoke") and entry.lease_id in budgets:
            delta = -budgets.pop(entry.lease_id)
        else:
            continue
        for t in chain(tenant_of[entry.lease_id]):
            granted[t] += delta
            peak[t] = max(peak[t], granted[t])
    return peak


@pytest.mark.timeout(180)
def test_sigkill_under_load_loses_no_grant(tmp_path: Path, database_url: str) -> None:
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    with cluster:
        with Client(cluster.broker_address) as c:
            for name, parent, mib in TREE:
                c.set_tenant(name, mib * MiB, parent=parent)
        with SimNode(cluster.broker_address) as node:
            load = Load(cluster.broker_address)
            thread = load.run(workers=12)
            assert load.started.wait(30), "no grant before the kill"
            # Let the load run a little, then kill -9 in the middle of it.
            deadline = threading.Event()
            deadline.wait(0.7)
            cluster.stop("broker", sig=signal.SIGKILL)
            load.stop.set()
            thread.join(30)
            assert not thread.is_alive()
            assert load.acked, "no acknowledged grant"
            assert load.released, "the quotas never pushed back: the audit check would be idle"
            print(
                f"acked {len(load.acked)} released {len(load.released)} unknown {len(load.unknown)}"
            )

            # Restart on the same database; the node reconnects.
            node.address = cluster.start_broker()
            assert node.connected.wait(30)

            store = Store(database_url)
            try:
                # 1. No acknowledged grant or release lost.
                leases = {x.lease_id: x for x in store.list_leases(include_inactive=True)}
                for key, lid in load.acked.items():
                    assert lid in leases, f"acked grant {lid} ({key}) lost"
                    assert leases[lid].idempotency_key == key
                for lid in load.released:
                    assert leases[lid].state.value == "released", f"acked release {lid} lost"
                # 2. No level ever over its quota, replaying the audit in commit order, and the
                #    restarted broker's view agrees with the database.
                peak = audit_replay(store)
                for name, _, mib in TREE:
                    assert peak[name] <= mib * MiB, f"{name}: {peak[name]} > {mib} MiB"
                active = [x for x in leases.values() if x.state.value == "active"]
                with Client(cluster.broker_address) as c:
                    for t in c.list_tenants():
                        assert t.granted_memory_bytes <= t.memory_quota_bytes
                    by_tenant = {t.name: t for t in c.list_tenants()}
                    assert sum(by_tenant[x].granted_memory_bytes for x in LEAVES) == LEASE * len(
                        active
                    )
                    # 3. Clients recover: a retry with the same key gets the same lease
                    #    (acked ones still active), or the durable one (answer lost in the crash).
                    for key, lid in load.acked.items():
                        if leases[lid].state.value != "active":
                            continue
                        again = c.reserve(leases[lid].tenant, LEASE, idempotency_key=key)
                        assert again.lease_id == lid
                    by_key = {x.idempotency_key: x for x in active}
                    for key, tenant in load.unknown.items():
                        try:
                            again = c.reserve(tenant, LEASE, idempotency_key=key)
                        except QuotaExceededError:
                            assert key not in by_key
                            continue
                        if key in by_key:
                            assert again.lease_id == by_key[key].lease_id
            finally:
                store.close()
