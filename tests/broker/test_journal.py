"""The journal's group commit against a real store: writes land in the order submitted, across
loop rounds and batch sizes, and a read sees every write submitted before it."""

from __future__ import annotations

import asyncio

from agentcg.broker.journal import Journal
from agentcg.broker.model import Change, PutTenant, Tenant, TenantName
from agentcg.broker.store import Store


def quota_change(name: str, quota: int) -> Change:
    return PutTenant(Tenant(TenantName(name), quota))


def read_quotas(store: Store) -> dict[str, int]:
    return {t.name: t.memory_quota_bytes for t in store.load().tenants}


async def mixed_load(journal: Journal, store: Store) -> list[dict[str, int]]:
    """Rounds of one change, of 40 and of 201 changes, and reads, within one loop round and
    across rounds; every read must see every write submitted before it."""
    journal.start()
    seen: list[dict[str, int]] = []
    try:
        for step in range(30):
            futures = []
            # Several submissions in the same loop round: one small, then a big one.
            futures.append(journal.submit([quota_change("a", 1000 + step)]))
            if step % 3 == 0:
                big = [quota_change(f"bulk{k}", step * 100 + k) for k in range(40)]
                futures.append(journal.submit(big))
            futures.append(journal.submit([quota_change("b", 2000 + step)]))
            await asyncio.gather(*futures)
            # A big round and, next loop round while the thread may still be writing it, a
            # small one changing the same tenant: the small one must land last.
            first = journal.submit(
                [quota_change("d", 1)] + [quota_change(f"more{k}", k) for k in range(200)]
            )
            await asyncio.sleep(0)
            await asyncio.gather(first, journal.submit([quota_change("d", 4000 + step)]))
            # A lone small change after everything earlier settled.
            await journal.commit([quota_change("c", 3000 + step)])
            if step % 5 == 4:
                seen.append(await journal.run_in_db(lambda: read_quotas(store)))
    finally:
        await journal.close()
    return seen


def test_writes_and_reads_keep_their_order(store: Store) -> None:
    journal = Journal(store)
    seen = asyncio.run(mixed_load(journal, store))

    for i, quotas in enumerate(seen):
        step = 5 * i + 4
        assert quotas["a"] == 1000 + step
        assert quotas["b"] == 2000 + step
        assert quotas["c"] == 3000 + step
        assert quotas["d"] == 4000 + step
        last_bulk = step - step % 3
        assert quotas["bulk7"] == last_bulk * 100 + 7
    final = read_quotas(store)
    assert (final["a"], final["b"], final["c"], final["d"]) == (1029, 2029, 3029, 4029)
    assert final["bulk39"] == 27 * 100 + 39
    assert journal.changes == 30 * (3 + 202) + 10 * 40
