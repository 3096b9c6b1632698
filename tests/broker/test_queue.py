"""The admission queue through a real broker process: wait up to the caller's deadline, admit by
priority when capacity frees, preempt lower-priority leases through the node stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster, scrape_metric
from agentcg.clients.sdk import AsyncClient, Lease
from agentcg.clients.simnode import SimNode
from agentcg.errors import QuotaExceededError
from agentcg.v1 import broker_pb2

MiB = 1 << 20


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[tuple[str, SimNode]]:
    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        with SimNode(c.broker_address, memory_bytes=1 << 34) as node:
            yield c.broker_address, node


async def settle(c: AsyncClient) -> None:
    """A round trip, so the broker has handled everything sent before."""
    await c.ping()
    await asyncio.sleep(0.05)


def test_waits_until_capacity_frees_or_its_deadline(env: tuple[str, SimNode]) -> None:
    address, _ = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 64 * MiB)
            first = await c.reserve("t", 64 * MiB)
            with pytest.raises(QuotaExceededError) as late:
                await c.reserve("t", 32 * MiB, queue_timeout_ms=200)
            assert "waited 200 ms" in late.value.message
            assert late.value.largest_memory_bytes_available == 0
            waiting = asyncio.ensure_future(c.reserve("t", 32 * MiB, queue_timeout_ms=30_000))
            await settle(c)
            assert not waiting.done()
            await c.release(first.lease_id)
            second = await waiting
            assert second.state == "active" and second.memory_bytes == 32 * MiB
            assert (await c.get_tenant("t")).granted_memory_bytes == 32 * MiB

    asyncio.run(go())


def test_priority_then_arrival_when_capacity_frees(env: tuple[str, SimNode]) -> None:
    address, _ = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 64 * MiB)
            hold = await c.reserve("t", 64 * MiB, priority=9)
            order: list[str] = []

            async def queued(name: str, priority: int) -> str:
                lease = await c.reserve("t", 64 * MiB, priority=priority, queue_timeout_ms=30_000)
                order.append(name)
                return lease.lease_id

            low1 = asyncio.ensure_future(queued("low1", 1))
            await settle(c)
            low2 = asyncio.ensure_future(queued("low2", 1))
            await settle(c)
            high = asyncio.ensure_future(queued("high", 5))
            await settle(c)
            await c.release(hold.lease_id)
            await c.release(await high)
            await c.release(await low1)
            await c.release(await low2)
            assert order == ["high", "low1", "low2"]

    asyncio.run(go())


def test_preempts_lower_priority_through_the_node_stream(env: tuple[str, SimNode]) -> None:
    address, node = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("org", 96 * MiB)
            await c.set_tenant("batch", 96 * MiB, parent="org")
            await c.set_tenant("live", 96 * MiB, parent="org")
            old = await c.reserve("batch", 48 * MiB, priority=0)
            young = await c.reserve("batch", 48 * MiB, priority=0)
            urgent = await c.reserve("live", 40 * MiB, priority=10, queue_timeout_ms=10_000)
            assert urgent.state == "active"
            # The youngest low-priority lease gave way, and only it.
            assert (await c.get_lease(young.lease_id)).state == "revoked"
            assert (await c.get_lease(old.lease_id)).state == "active"
            for _ in range(100):
                if node.decisions:
                    break
                await asyncio.sleep(0.05)
            [d] = node.decisions
            assert d.kind == broker_pb2.DECISION_KIND_PREEMPT
            assert d.lease_id == young.lease_id and d.epoch == young.epoch
            # Equal priority never preempts: it waits and times out.
            with pytest.raises(QuotaExceededError):
                await c.reserve("batch", 48 * MiB, priority=0, queue_timeout_ms=100)
            assert (await c.get_lease(old.lease_id)).state == "active"

    asyncio.run(go())


def test_no_admission_to_a_pressured_node_until_it_recovers(env: tuple[str, SimNode]) -> None:
    address, node = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 1 << 30)
            await c.reserve("t", MiB)
            node.outbox.put(
                broker_pb2.NodeMessage(
                    pressure=broker_pb2.PressureEvent(
                        event_id="e1", kind=broker_pb2.PRESSURE_KIND_NODE
                    )
                )
            )
            for _ in range(200):  # until the broker has taken the event in
                try:
                    await c.reserve("t", MiB)
                except QuotaExceededError as exc:
                    assert "no connected node" in exc.message
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the pressured node kept taking work")
            # No further pressure: it recovers (after PRESSURE_HOLD_MS) and a queued ask gets in.
            lease = await c.reserve("t", MiB, queue_timeout_ms=30_000)
            assert lease.node_id == node.node_id

    asyncio.run(go())


def test_declared_sessions_wait_instead_of_deadlocking(tmp_path: Path, database_url: str) -> None:
    """Two sessions declare 70 MiB each on a 100 MiB node. Granting either one's growth that
    would leave neither able to finish waits in the queue, while the other's growth that keeps
    an order to finish passes it; once the other session ends, the waiting growth is admitted."""

    async def go(address: str) -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 1 << 30)

            async def take(session: str, mib: int, wait_ms: int = 0) -> str:
                lease = await c.reserve(
                    "t",
                    mib * MiB,
                    session=session,
                    session_max_bytes=70 * MiB,
                    queue_timeout_ms=wait_ms,
                    ttl_ms=600_000,
                )
                return lease.lease_id

            a1 = await take("a", 40)
            b1 = await take("b", 30)
            # 30 MiB free. b to 50 would leave 10 free: a needs 30, b needs 20: unsafe.
            with pytest.raises(QuotaExceededError) as unsafe:
                await take("b", 20)
            assert unsafe.value.code == "node_unsafe"
            assert "waiting on each other" in unsafe.value.message
            b_waits = asyncio.ensure_future(take("b", 20, 30_000))
            await settle(c)
            assert not b_waits.done()
            a2 = await take("a", 30)  # a to its maximum: 0 free, but a can finish: safe
            assert not b_waits.done()
            await c.release(a2)  # a back at 40 of 70: b's growth is still unsafe
            await settle(c)
            assert not b_waits.done()
            await c.release(a1)  # a ended: b can reach its maximum
            await b_waits
            leases = await c.list_leases(tenant="t")
            assert sum(x.memory_bytes for x in leases) == 50 * MiB
            assert b1 in {x.lease_id for x in leases}

    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        with SimNode(c.broker_address, memory_bytes=100 * MiB):
            asyncio.run(go(c.broker_address))


def test_a_retried_queued_reserve_joins_the_same_waiter(env: tuple[str, SimNode]) -> None:
    """Same idempotency key while the first ask is still queued: the retry waits with it and
    both get the same lease; one that gives up early leaves the others queued."""
    address, _ = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 64 * MiB)
            hold = await c.reserve("t", 64 * MiB)

            def ask(timeout_ms: int = 30_000) -> asyncio.Future[object]:
                return asyncio.ensure_future(
                    c.reserve("t", 32 * MiB, idempotency_key="k1", queue_timeout_ms=timeout_ms)
                )

            first = ask()
            await settle(c)
            retry = ask()
            await settle(c)
            with pytest.raises(QuotaExceededError):  # its own deadline; the others stay queued
                await ask(100)
            assert not first.done() and not retry.done()
            await c.release(hold.lease_id)
            a, b = await first, await retry
            assert a.lease_id == b.lease_id  # type: ignore[attr-defined]
            t = await c.get_tenant("t")
            assert t.active_leases == 1 and t.granted_memory_bytes == 32 * MiB
            # Once granted, a later retry gets the same lease at once.
            again = await c.reserve("t", 32 * MiB, idempotency_key="k1")
            assert again.lease_id == a.lease_id  # type: ignore[attr-defined]

    asyncio.run(go())


def test_a_queued_retry_outlives_the_caller_that_gave_up(env: tuple[str, SimNode]) -> None:
    address, _ = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 64 * MiB)
            hold = await c.reserve("t", 64 * MiB)
            key = {"idempotency_key": "k2", "queue_timeout_ms": 30_000}
            first = asyncio.ensure_future(c.reserve("t", 32 * MiB, **key))  # type: ignore[arg-type]
            await settle(c)
            retry = asyncio.ensure_future(c.reserve("t", 32 * MiB, **key))  # type: ignore[arg-type]
            await settle(c)
            first.cancel()  # the original caller goes away (cancelled RPC)
            await settle(c)
            await c.release(hold.lease_id)
            lease = await retry
            assert lease.state == "active" and lease.memory_bytes == 32 * MiB
            t = await c.get_tenant("t")
            assert t.active_leases == 1 and t.granted_memory_bytes == 32 * MiB

    asyncio.run(go())


def test_many_waiters_at_their_quota_hold_back_no_other_tenant(env: tuple[str, SimNode]) -> None:
    """200 equal asks wait at tenant a's quota (a pump passes over them as one); tenant b's
    queued ask is admitted past them as soon as b's own lease ends. Then a's waiters go one at a
    time as a's capacity frees, the earliest first, each with a lease of its own."""
    address, _ = env

    async def go() -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("a", 64 * MiB)
            await c.set_tenant("b", 64 * MiB)
            a_hold = await c.reserve("a", 64 * MiB)
            b_hold = await c.reserve("b", 64 * MiB)

            def a_waits() -> asyncio.Future[Lease]:
                return asyncio.ensure_future(c.reserve("a", 64 * MiB, queue_timeout_ms=60_000))

            first = a_waits()
            await settle(c)  # it arrives before the others
            rest = [a_waits() for _ in range(199)]
            await settle(c)
            b_waiting = asyncio.ensure_future(c.reserve("b", 64 * MiB, queue_timeout_ms=60_000))
            await settle(c)
            await c.release(b_hold.lease_id)
            b_lease = await asyncio.wait_for(b_waiting, 10)
            assert b_lease.tenant == "b"
            assert not first.done() and not any(f.done() for f in rest)  # a's quota holds them
            await c.release(a_hold.lease_id)
            assert (await asyncio.wait_for(first, 10)).tenant == "a"
            assert not any(f.done() for f in rest)  # one at a time: a's quota is one ask
            ids = {first.result().lease_id}
            await c.release(first.result().lease_id)
            pending = set(rest)
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
                assert len(done) == 1, f"{len(done)} admitted at once within a's quota"
                lease = done.pop().result()
                ids.add(lease.lease_id)
                await c.release(lease.lease_id)
            assert len(ids) == 200

    asyncio.run(go())


def test_the_queue_is_bounded_in_all_and_per_tenant(tmp_path: Path, database_url: str) -> None:
    """Beyond --max-queued-per-tenant (2) or --max-queued (3) an ask that would wait is denied
    at once (queue_full), the queue and the quotas as they were; a retry of a queued ask still
    joins it, and room freed by a waiter that gave up is taken again."""
    flags = ("--max-queued", "3", "--max-queued-per-tenant", "2", "--metrics-listen", "127.0.0.1:0")
    with (
        LocalCluster(
            tmp_path, nodes=0, database_url=database_url, log_level="WARNING", broker_args=flags
        ) as cluster,
        SimNode(cluster.broker_address, memory_bytes=1 << 34),
    ):

        async def go() -> None:
            async with AsyncClient(cluster.broker_address) as c:
                for t in ("a", "b", "c"):
                    await c.set_tenant(t, 16 * MiB)  # every ask below is over its quota

                def wait(
                    tenant: str, timeout_ms: int = 30_000, key: str = ""
                ) -> asyncio.Future[Lease]:
                    return asyncio.ensure_future(
                        c.reserve(
                            tenant, 32 * MiB, queue_timeout_ms=timeout_ms, idempotency_key=key
                        )
                    )

                a1, a2 = wait("a", key="a1"), wait("a", timeout_ms=1_000)
                await settle(c)
                with pytest.raises(QuotaExceededError) as per_tenant:
                    await c.reserve("a", 32 * MiB, queue_timeout_ms=30_000)
                e = per_tenant.value
                assert (e.code, e.scope) == ("queue_full", "tenant:a")
                assert "tenant a has 2 Reserves waiting (at most 2)" in e.message
                assert "memory quota exceeded" in e.message  # why it would have waited
                b1 = wait("b")
                await settle(c)
                with pytest.raises(QuotaExceededError) as overall:
                    await c.reserve("c", 32 * MiB, queue_timeout_ms=30_000)
                assert (overall.value.code, overall.value.scope) == ("queue_full", "cluster")
                assert "the queue holds 3 Reserves (at most 3)" in overall.value.message
                # A retry of a queued ask joins it: no new place needed.
                again = wait("a", key="a1")
                await settle(c)
                assert not again.done() and not a1.done()
                # a2 gives up at its deadline: its place is free for another of a's asks.
                with pytest.raises(QuotaExceededError, match="waited 1000 ms"):
                    await a2
                a3 = wait("a")
                await settle(c)
                assert not a3.done()
                assert [(await c.get_tenant(t)).active_leases for t in "abc"] == [0, 0, 0]
                await c.set_tenant("a", 128 * MiB)  # room: a's waiters are admitted
                first, retried, third = await asyncio.gather(a1, again, a3)
                assert first.lease_id == retried.lease_id != third.lease_id
                b1.cancel()

        asyncio.run(go())
        metrics = cluster.metrics_address("broker")
        assert (
            scrape_metric(
                metrics, "agentcg_broker_reserve_total", rpc="Reserve", outcome="queue_full"
            )
            == 2
        )


def test_a_lease_ending_outside_the_holding_tenants_starts_no_round(
    tmp_path: Path, database_url: str
) -> None:
    """100 asks wait at tenant a's quota. 50 Reserve+Release pairs of tenant b start no round
    over them (each would deny all 100 again, at a cost that grows with the queue); a's own
    lease ending does, and lets a's first waiter in; raising a's quota lets the rest in."""
    flags = ("--metrics-listen", "127.0.0.1:0")
    with (
        LocalCluster(
            tmp_path, nodes=0, database_url=database_url, log_level="WARNING", broker_args=flags
        ) as cluster,
        SimNode(cluster.broker_address, memory_bytes=1 << 34),
    ):
        metrics = cluster.metrics_address("broker")

        def rounds() -> float:
            return scrape_metric(metrics, "agentcg_broker_queue_rounds_total")

        async def go() -> None:
            async with AsyncClient(cluster.broker_address) as c:
                await c.set_tenant("a", 64 * MiB)
                await c.set_tenant("b", 1 << 30)
                hold = await c.reserve("a", 64 * MiB)
                first = asyncio.ensure_future(c.reserve("a", 64 * MiB, queue_timeout_ms=60_000))
                await settle(c)
                rest = [
                    asyncio.ensure_future(c.reserve("a", 64 * MiB, queue_timeout_ms=60_000))
                    for _ in range(99)
                ]
                await settle(c)
                before = rounds()
                for _ in range(50):
                    await c.release((await c.reserve("b", 32 * MiB)).lease_id)
                assert rounds() - before <= 2, "b's releases walked a's waiters"
                assert not first.done() and not any(f.done() for f in rest)
                await c.release(hold.lease_id)  # a's own capacity: a round, a's first gets in
                assert (await asyncio.wait_for(first, 10)).tenant == "a"
                assert rounds() > before
                assert not any(f.done() for f in rest)
                await c.set_tenant("a", 101 * 64 * MiB)
                leases = await asyncio.wait_for(asyncio.gather(*rest), 30)
                assert len({x.lease_id for x in leases}) == 99

        asyncio.run(go())


def test_a_timed_out_waiter_is_told_what_fits_when_it_gives_up(
    tmp_path: Path, database_url: str
) -> None:
    """The hint a waiter gets at its deadline is decided then, not taken from the round it was
    last tried in: grants start no round, and here another tenant's grant took the node's
    room after tenant a's waiter was denied by a's own quota."""

    async def go(address: str) -> None:
        async with AsyncClient(address) as c:
            await c.set_tenant("a", 100 * MiB)
            await c.set_tenant("b", 1 << 30)
            await c.reserve("a", 60 * MiB)  # a has 40 MiB left
            waiting = asyncio.ensure_future(c.reserve("a", 64 * MiB, queue_timeout_ms=1500))
            await settle(c)
            await c.reserve("b", 190 * MiB)  # the node (256 MiB) has 6 MiB left
            with pytest.raises(QuotaExceededError) as late:
                await waiting
            assert "waited 1500 ms" in late.value.message
            assert late.value.largest_memory_bytes_available == 6 * MiB

    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        with SimNode(c.broker_address, memory_bytes=256 * MiB):
            asyncio.run(go(c.broker_address))
