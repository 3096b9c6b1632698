"""The broker's servicers through a real broker process on a real database (SQLite and
PostgreSQL): batched admission, idempotent retries that wait for durability, bad input."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentcg.broker.model import LeaseId
from agentcg.broker.store import Store
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import AsyncClient, Client, Lease
from agentcg.clients.simnode import SimNode
from agentcg.errors import InvalidArgumentError, NotFoundError, QuotaExceededError
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2

MiB = 1 << 20


@pytest.fixture
def broker(tmp_path: Path, database_url: str) -> Iterator[tuple[str, str]]:
    """(broker address, database URL) with one connected simulated node."""
    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        with SimNode(c.broker_address, memory_bytes=1 << 34):
            yield c.broker_address, database_url


def ask(tenant: str, memory_bytes: int, key: str = "") -> broker_pb2.ReserveRequest:
    return broker_pb2.ReserveRequest(
        tenant=tenant,
        intent=types_pb2.Resources(memory_bytes=memory_bytes),
        idempotency_key=key,
    )


def test_concurrent_retries_get_the_same_durable_lease(broker: tuple[str, str]) -> None:
    address, url = broker
    store = Store(url)

    async def go() -> list[tuple[Lease, bool]]:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 1 << 30)

            async def one() -> tuple[Lease, bool]:
                lease = await c.reserve("t", 8 * MiB, idempotency_key="k1")
                # Checked at the moment the reply arrived: the grant is in the database.
                return lease, store.get_lease(lease.lease_id) is not None  # type: ignore[arg-type]

            return await asyncio.gather(*(one() for _ in range(20)))

    try:
        results = asyncio.run(go())
    finally:
        store.close()
    assert len({lease.lease_id for lease, _ in results}) == 1
    assert all(durable for _, durable in results)
    with Client(address) as c:
        assert c.get_tenant("t").granted_memory_bytes == 8 * MiB


def test_reserve_batch_grants_in_order_and_denies_per_item(broker: tuple[str, str]) -> None:
    address, url = broker
    with Client(address) as c:
        c.set_tenant("t", 40 * MiB)
        got = c.reserve_batch([ask("t", 16 * MiB), ask("t", 16 * MiB), ask("t", 16 * MiB)])
        assert [isinstance(x, Lease) for x in got] == [True, True, False]
        denial = got[2]
        assert isinstance(denial, QuotaExceededError)
        assert denial.largest_memory_bytes_available == 8 * MiB
        assert "tenant t" in denial.message
        # Retried with keys: the same leases come back.
        keyed = c.reserve_batch([ask("t", 4 * MiB, "a"), ask("t", 4 * MiB, "a")])
        assert isinstance(keyed[0], Lease) and isinstance(keyed[1], Lease)
        assert keyed[0].lease_id == keyed[1].lease_id
        ids = [x.lease_id for x in got[:2] if isinstance(x, Lease)] + [keyed[0].lease_id]
        released = c.release_batch(ids + ids[:1])  # a repeated release is idempotent
        assert [x.state for x in released] == ["released"] * 4
        assert c.get_tenant("t").granted_memory_bytes == 0
    store = Store(url)
    try:
        assert {x.lease_id for x in store.list_leases(include_inactive=True)} == set(ids)
    finally:
        store.close()


def test_reserve_batch_bad_item_changes_nothing(broker: tuple[str, str]) -> None:
    address, url = broker
    with Client(address) as c:
        c.set_tenant("t", 1 << 30)
        with pytest.raises(InvalidArgumentError) as err:
            c.reserve_batch([ask("t", MiB), ask("t", -1)])
        assert err.value.field == "requests[1].intent.memory_bytes"
        with pytest.raises(NotFoundError) as nf:
            c.reserve_batch([ask("t", MiB), ask("nobody", MiB)])
        assert "requests[1].tenant" in nf.value.message
        with pytest.raises(NotFoundError):
            c.release_batch(["0" * 32])
        assert c.get_tenant("t").active_leases == 0
    store = Store(url)
    try:
        assert store.list_leases(include_inactive=True) == []
    finally:
        store.close()


def test_get_lease_says_when_by_the_brokers_clock(broker: tuple[str, str]) -> None:
    """A node on another host counts a lease's time left from the broker's clock (as_of), not
    its own: GetLease fills it in at its answer."""
    address, _ = broker
    with Client(address) as c:
        c.set_tenant("t", 1 << 30)
        lease = c.reserve("t", MiB, ttl_ms=5_000)
    with grpc.insecure_channel(address) as channel:
        before_ms = int(time.time() * 1000)
        pb = broker_pb2_grpc.BrokerStub(channel).GetLease(
            broker_pb2.GetLeaseRequest(lease_id=lease.lease_id), timeout=5
        )
        after_ms = int(time.time() * 1000)
    assert before_ms <= pb.as_of_unix_ms <= after_ms  # the broker runs on this host's clock
    assert 0 < pb.expires_at_unix_ms - pb.as_of_unix_ms <= 5_000


@pytest.mark.parametrize("key", ["", "mine"])
def test_a_reserve_cancelled_with_its_grant_in_flight_gives_it_back(
    broker: tuple[str, str], key: str
) -> None:
    """A caller gives up on a Reserve (its timeout, Ctrl-C) after the broker granted it, the
    reply still on its way. Without a key of its own nobody can ask for that lease again: the
    SDK asks once more with its key and releases the lease. A caller's own key: the caller may
    ask again, and gets the lease, still active."""
    address, _ = broker

    async def go() -> list[Lease]:
        async with AsyncClient(address) as c:
            await c.set_tenant("t", 64 * MiB)
            stub = c._current().broker
            real = stub.Reserve
            granted = asyncio.Event()

            def in_flight(request: broker_pb2.ReserveRequest, **kw: object) -> object:
                async def call() -> broker_pb2.ReserveResponse:
                    reply = await real(request, **kw)  # type: ignore[arg-type]
                    granted.set()
                    await asyncio.sleep(60)  # the reply, on its way when the caller gives up
                    return reply

                return call()

            stub.Reserve = in_flight  # type: ignore[method-assign]
            asking = asyncio.create_task(c.reserve("t", 16 * MiB, idempotency_key=key))
            await granted.wait()
            stub.Reserve = real  # type: ignore[method-assign]
            asking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asking
            if key:
                again = await c.reserve("t", 16 * MiB, idempotency_key=key)
                assert again.state == "active"
        async with AsyncClient(address) as c:
            return await c.list_leases(tenant="t", include_inactive=True)

    (lease,) = asyncio.run(go())
    with Client(address) as c:
        if key:
            assert lease.state == "active"
            assert c.get_tenant("t").granted_memory_bytes == 16 * MiB
        else:
            assert (lease.state, lease.outcome) == ("released", "failed")
            assert c.get_tenant("t").granted_memory_bytes == 0


def test_a_sync_call_interrupted_before_it_began_never_begins(broker: tuple[str, str]) -> None:
    """Ctrl-C on the sync client while its loop is still busy (the call has not begun): the
    call is stopped before any of it runs (no Reserve goes out after the interrupt, to be given
    back later), and the interrupt returns once the loop is free, not after the timeout."""
    address, _ = broker
    with Client(address, timeout_s=20) as c:
        c.set_tenant("t", 64 * MiB)
        main = threading.main_thread().ident
        assert main is not None
        c._loop.call_soon_threadsafe(time.sleep, 2.0)  # the loop busy: the call cannot start
        interrupt = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            interrupt.start()
            c.reserve("t", 16 * MiB)
        waited_s = time.monotonic() - started
        assert waited_s < 10, f"the interrupted call waited {waited_s:.1f} s"
        assert c.list_leases(tenant="t", include_inactive=True) == []
        assert c.get_tenant("t").granted_memory_bytes == 0


def test_an_ended_lease_keeps_every_other_field() -> None:
    """BrokerCore.ended spells the lease's fields out: none may be dropped or reset."""
    import dataclasses
    from types import SimpleNamespace

    from agentcg.broker.ledger import Ledger
    from agentcg.broker.model import Lease, LeaseState, Outcome
    from agentcg.broker.service import BrokerCore

    values: dict[str, object] = {}
    for i, f in enumerate(dataclasses.fields(Lease)):
        values[f.name] = i + 7 if f.type in ("int", "int | None") else f"v{i}"
    values |= {"state": LeaseState.ACTIVE, "outcome": Outcome.GROWN}
    lease = Lease(**values)  # type: ignore[arg-type]
    core = SimpleNamespace(ledger=Ledger())  # the lease is not its session's last one there
    ended = BrokerCore.ended(
        core,  # type: ignore[arg-type]
        lease,
        LeaseState.RELEASED,
        99,
        peak_bytes=3,
        outcome=Outcome.UNKNOWN,
    )
    expected = dataclasses.replace(
        lease,
        state=LeaseState.RELEASED,
        ended_at_ms=99,
        peak_memory_bytes=lease.peak_memory_bytes,
        session_peak_bytes=0,
    )
    assert ended == expected


def test_the_broker_deletes_history_past_its_retention(tmp_path: Path, database_url: str) -> None:
    """``--history-days``: an ended lease and its audit go once older than the retention (here
    5.2 s); an active lease stays, however old."""
    retention = ("--history-days", "0.00006")
    with (
        LocalCluster(
            tmp_path, nodes=0, database_url=database_url, log_level="WARNING", broker_args=retention
        ) as c,
        SimNode(c.broker_address, memory_bytes=1 << 34),
        Client(c.broker_address) as client,
    ):
        client.set_tenant("t", 1 << 32)
        kept = client.reserve("t", 64 * MiB, ttl_ms=600_000)
        ended = client.reserve("t", 64 * MiB)
        client.release(ended.lease_id)
        assert client.get_lease(ended.lease_id).state == "released"  # still there
        store = Store(database_url)
        try:
            assert [e.kind for e in store.audit(lease_id=ended.lease_id)] == ["reserve", "release"]
            deadline = time.monotonic() + 60
            while store.get_lease(LeaseId(ended.lease_id)) and time.monotonic() < deadline:
                time.sleep(0.2)
            with pytest.raises(NotFoundError):
                client.get_lease(ended.lease_id)
            assert store.audit(lease_id=ended.lease_id) == []
            assert client.get_lease(kept.lease_id).state == "active"
            assert [le.lease_id for le in store.list_leases()] == [kept.lease_id]
        finally:
            store.close()


def test_no_kill_for_a_lease_the_database_holds_but_this_broker_does_not(
    tmp_path: Path, database_url: str
) -> None:
    """A broker asked to grow a lease it does not hold: if the database holds it active on that
    node (a new leader granted it; this broker has not noticed it lost the lead) it decides
    nothing; a lease the database does not hold either is killed."""
    from agentcg.broker.model import PutLease

    from .test_store import lease

    with (
        LocalCluster(tmp_path, nodes=0, database_url=database_url) as c,
        SimNode(c.broker_address, "sim-0") as node,
    ):
        with Client(c.broker_address) as client:
            client.set_tenant("t1", 1 << 30)
        far = int(time.time() * 1000) + 600_000
        ghost = lease("ghost-1", node_id="sim-0", granted_at_ms=far - 1_000, expires_at_ms=far)
        store = Store(database_url)
        try:
            store.apply([PutLease(ghost)])  # behind the broker's back
        finally:
            store.close()

        def limit_reached(lease_id: str) -> broker_pb2.NodeMessage:
            return broker_pb2.NodeMessage(
                pressure=broker_pb2.PressureEvent(
                    event_id=lease_id,
                    lease_id=lease_id,
                    kind=broker_pb2.PRESSURE_KIND_LIMIT_REACHED,
                    requested_memory_bytes=2 << 30,
                )
            )

        node.outbox.put(limit_reached("ghost-1"))
        node.outbox.put(limit_reached("nowhere-1"))
        deadline = time.monotonic() + 20
        while not node.decisions:
            assert time.monotonic() < deadline, "no decision came down the stream"
            time.sleep(0.02)
        time.sleep(0.2)  # any decision about the ghost would have come first
        assert [(d.lease_id, d.kind) for d in node.decisions] == [
            ("nowhere-1", broker_pb2.DECISION_KIND_KILL)
        ]
        assert "lease ghost-1 is active on node sim-0 in the database" in c.log("broker")
