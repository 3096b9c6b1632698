"""The journal's group commit against a real store: writes land in the order submitted, across
loop rounds and batch sizes, and a read sees every write submitted before it; and its sampling
of how busy the event loop is (saturated from 90% on, until under 75%)."""

from __future__ import annotations

import asyncio
import time

from agentcg.broker.journal import SAMPLE_S, Journal
from agentcg.broker.metrics import BrokerMetrics
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


class _BusyClock:
    """Busy seconds, accumulating at ``rate`` of the wall clock."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._at = time.monotonic()
        self._busy = 0.0

    def __call__(self) -> float:
        now = time.monotonic()
        self._busy += self.rate * (now - self._at)
        self._at = now
        return self._busy

    def set(self, rate: float) -> None:
        self()
        self.rate = rate


def test_the_loop_counts_as_saturated_from_90_percent_until_under_75(store: Store) -> None:
    metrics = BrokerMetrics()
    clock = _BusyClock()

    async def run() -> list[tuple[bool, float | None]]:
        journal = Journal(store, metrics=metrics, busy_clock=clock)
        journal.start()
        seen = []
        try:
            for rate in (0.8, 0.95, 0.8, 0.5, 0.8):
                clock.set(rate)
                await asyncio.sleep(5 * SAMPLE_S)  # the last windows all at this rate
                busy = metrics.registry.get_sample_value("agentcg_broker_loop_busy_ratio")
                seen.append((journal.saturated, busy))
        finally:
            await journal.close()
        return seen

    seen = asyncio.run(run())
    assert [saturated for saturated, _ in seen] == [False, True, True, False, False]
    for (_, busy), rate in zip(seen, (0.8, 0.95, 0.8, 0.5, 0.8), strict=True):
        assert busy is not None and abs(busy - rate) < 0.01
