"""Two brokers on one database: one serves, the other stands by and takes over (leadership.py).

Real broker processes on SQLite and on PostgreSQL (conftest.database_url). Without the lock a
second broker served its own, empty view of the database: it did not know the first one's
tenants, and with both loaded each would have admitted up to every quota.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentcg.broker.leadership import CHECK_S, LOST_EXIT_CODE, Watchdog, lock_for
from agentcg.broker.model import (
    PutLease,
    PutTenant,
    Tenant,
    TenantName,
)
from agentcg.broker.store import FENCE_SQL, Store, StoreError, StoreFenced
from agentcg.channels import broker_interceptors
from agentcg.clients.cluster import BrokerProcess, child_pids, leader_and_standby
from agentcg.clients.sdk import Client, broker_channel_options
from agentcg.clients.simnode import SimNode
from agentcg.errors import QuotaExceededError, UnavailableError
from sqlalchemy import create_engine, text

from .test_store import lease

MiB = 1 << 20


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for b in started:
        b.stop(signal.SIGKILL)


def open_files(pid: int) -> set[str]:
    """What ``pid``'s descriptors point at. A writer still importing opens and closes module
    files meanwhile: a descriptor gone between the listing and its readlink is skipped (seen
    in CI: FileNotFoundError on /proc/<pid>/fd/4)."""
    opened = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            opened.add(os.readlink(fd))
    return opened


@pytest.mark.timeout(180)
def test_standby_takes_over_with_the_leaders_state(
    tmp_path: Path, database_url: str, brokers: list[BrokerProcess]
) -> None:
    a, b = leader_and_standby(tmp_path, database_url, brokers)
    # A standby starts its writer process ahead: it does its imports while the broker waits.
    (writer,) = child_pids(b.proc.pid)
    if database_url.startswith("sqlite"):  # it holds the lock's file (FileLock.child_fds)
        assert f"{tmp_path}/broker.db.lock" in open_files(writer)
    # Both in one target: gRPC clients (and nodes) go to whichever listens.
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    with SimNode(target) as node, Client(target, timeout_s=10) as c:
        c.set_tenant("acme", 64 * MiB)
        held = c.reserve("acme", 48 * MiB, idempotency_key="k1")
        assert a.leader_gauge() == 1
        assert b.leader_gauge() == 0
        assert not b.ready.exists(), "the standby serves"
        with grpc.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            with pytest.raises(grpc.FutureTimeoutError):  # nothing listens there
                grpc.channel_ready_future(ch).result(timeout=1)

        a.stop(signal.SIGKILL)
        node.connected.clear()
        # A call made while nothing serves waits for the new leader (waitForReady: the target
        # names several brokers) instead of failing with UNAVAILABLE. On a new channel: one
        # that was connected to the old leader may send a call down the dead connection before
        # it has seen it close (UNAVAILABLE, "Stream removed", seen in CI).
        assert not b.ready.exists()
        with Client(target, timeout_s=60) as during:
            assert during.get_tenant("acme").granted_memory_bytes == 48 * MiB
        b.wait_ready()
        assert b.leader_gauge() == 1
        assert f"database writer process {writer} started" in b.log_text()
        if database_url.startswith("postgresql"):  # each leader fences the one before
            assert "leadership epoch 1" in a.log_text()
            assert b.metric("agentcg_broker_leadership_epoch") == 2
        assert node.connected.wait(30), "the node did not follow to the new leader"

        # The new leader's view is the database's: the tenant, and the lease against its quota.
        tenant = c.get_tenant("acme")
        assert tenant.granted_memory_bytes == 48 * MiB
        with pytest.raises(QuotaExceededError):
            c.reserve("acme", 32 * MiB)
        assert c.reserve("acme", 48 * MiB, idempotency_key="k1").lease_id == held.lease_id
        assert c.reserve("acme", 16 * MiB).memory_bytes == 16 * MiB
    # Start-up never waits on its own event loop (BrokerStateCollector.describe).
    assert "did not answer" not in a.log_text() + b.log_text()


@pytest.mark.timeout(240)
def test_reserves_in_flight_when_the_leader_dies_get_one_lease_each(
    tmp_path: Path, database_url: str, brokers: list[BrokerProcess]
) -> None:
    """The SDK sends a call that failed with UNAVAILABLE again to the new leader, and sends
    every Reserve with an idempotency key: a grant the old leader committed but never answered
    comes back as that lease, not as a second one nobody holds."""
    a, b = leader_and_standby(tmp_path, database_url, brokers)
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    engine = create_engine(database_url)

    def active_in_db() -> set[str]:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT lease_id FROM leases WHERE tenant = 'acme' AND state = 'active'")
            )
            return {r[0] for r in rows}

    got: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        with SimNode(target), Client(target, timeout_s=60) as c:
            c.set_tenant("acme", 1 << 40)

            def worker() -> None:
                while not stop.is_set():
                    try:
                        # Queued, not denied, while the node reconnects to the new leader.
                        lease = c.reserve("acme", MiB, queue_timeout_ms=30_000)
                    except Exception as exc:
                        errors.append(repr(exc))
                        return
                    with lock:
                        got.append(lease.lease_id)

            workers = [threading.Thread(target=worker) for _ in range(8)]
            for t in workers:
                t.start()
            # Freeze the leader (not its writer process, which commits what it was handed) until
            # it holds a committed grant it has not answered; then kill it.
            unanswered: set[str] = set()
            for _ in range(50):
                time.sleep(0.2)
                a.proc.send_signal(signal.SIGSTOP)
                time.sleep(0.3)  # the writer's commits end; answers already sent arrive
                with lock:
                    answered = set(got)
                unanswered = active_in_db() - answered
                if unanswered:
                    break
                a.proc.send_signal(signal.SIGCONT)
            assert unanswered, "the leader never held a committed grant it had not answered"
            a.stop(signal.SIGKILL)
            at_kill = len(answered)
            b.wait_ready()
            deadline = time.monotonic() + 60
            while len(got) < at_kill + 100 and not errors and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            for t in workers:
                t.join(90)
            assert errors == []
            assert len(got) >= at_kill + 100, "the workers did not go on with the new leader"
            assert len(got) == len(set(got))  # no lease handed out twice
            assert unanswered <= set(got)  # sent again, they got the grant the old leader made
            assert active_in_db() == set(got)  # and no grant is held by nobody
    finally:
        stop.set()
        engine.dispose()


@pytest.mark.timeout(120)
def test_a_standby_stops_cleanly(
    tmp_path: Path, database_url: str, brokers: list[BrokerProcess]
) -> None:
    a, b = leader_and_standby(tmp_path, database_url, brokers)
    (writer,) = child_pids(b.proc.pid)
    assert b.stop(signal.SIGTERM) == 0
    assert "stopping (was standing by)" in b.log_text()
    assert not Path(f"/proc/{writer}").exists(), "its writer process outlived it"
    assert a.proc.poll() is None


# An SQLite lock is the process's own: nothing else can take it away.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(120)
def test_a_leader_that_loses_its_lock_exits(
    tmp_path: Path, database_url: str, brokers: list[BrokerProcess]
) -> None:
    a = BrokerProcess(tmp_path, "a", database_url)
    brokers.append(a)
    a.wait_ready()
    admin = create_engine(database_url)
    try:
        with admin.begin() as conn:
            ended = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name"
                ),
                {"name": f"agentcg-broker-leader-{a.proc.pid}"},
            ).all()
    finally:
        admin.dispose()
    assert ended == [(True,)]
    assert a.proc.wait(10) == LOST_EXIT_CODE
    assert "lost the database's leadership lock" in a.log_text()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(120)
def test_a_leader_whose_commit_is_fenced_exits(
    tmp_path: Path, database_url: str, brokers: list[BrokerProcess]
) -> None:
    """Another broker took the epoch while this one still held its lock session (as when the
    server ended that session and the watchdog has not noticed yet): the commit fails and the
    broker stops at once instead of serving a state it can no longer change."""
    a = BrokerProcess(tmp_path, "a", database_url)
    brokers.append(a)
    a.wait_ready()
    with Client(a.address, timeout_s=10) as c:
        c.set_tenant("acme", 64 * MiB)
        admin = create_engine(database_url)
        try:
            with admin.begin() as conn:
                conn.execute(text("UPDATE leadership SET epoch = epoch + 1"))
        finally:
            admin.dispose()
        with pytest.raises(UnavailableError):
            c.set_tenant("acme", 32 * MiB)
    assert a.proc.wait(10) == LOST_EXIT_CODE
    assert "fenced: another broker leads" in a.log_text()
    check = Store(database_url)
    try:
        assert [t.memory_quota_bytes for t in check.load().tenants] == [64 * MiB]
    finally:
        check.close()


class _HangingLock:
    """A lock whose check never returns, as on a connection to a server that vanished."""

    watched = True

    def __init__(self) -> None:
        self.release = threading.Event()

    def describe(self) -> str:
        return "a hanging lock"

    def try_acquire(self) -> bool:
        return True

    def check(self) -> None:
        self.release.wait()

    def child_fds(self) -> tuple[int, ...]:
        return ()

    def close(self) -> None:
        self.release.set()


def test_a_check_that_never_answers_counts_as_lost() -> None:
    lock = _HangingLock()
    reasons: list[str] = []
    fired = threading.Event()

    def lost(reason: str) -> None:
        reasons.append(reason)
        fired.set()

    try:
        with Watchdog(lock, lost):
            assert fired.wait(30)
            time.sleep(2 * CHECK_S)  # it fires once
    finally:
        lock.close()
    assert len(reasons) == 1 and reasons[0].startswith("no check answered for")


def test_a_lock_nothing_else_can_take_is_not_watched(tmp_path: Path) -> None:
    lock = lock_for(f"sqlite:///{tmp_path}/broker.db")
    assert lock is not None and not lock.watched
    try:
        assert lock.try_acquire()
        other = lock_for(f"sqlite:///{tmp_path}/broker.db")
        assert other is not None
        try:
            assert not other.try_acquire()  # flock: per open file, so even in one process
        finally:
            other.close()
    finally:
        lock.close()
    assert lock_for("sqlite://") is None  # in memory: the process's own database
    with pytest.raises(StoreError, match="cannot open /nonexistent/x.db.lock: No such file"):
        lock_for("sqlite:////nonexistent/x.db")


def test_a_database_unreachable_at_start_is_an_error_not_a_wait(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    b = BrokerProcess(tmp_path, "b", "postgresql+psycopg://agentcg@127.0.0.1:1/none")
    brokers.append(b)
    assert b.proc.wait(60) == 1
    text = " ".join(b.log_text().split())  # the error may be wrapped
    assert "take the leadership lock: database 127.0.0.1:1/none unavailable" in text
    assert "standing by" not in b.log_text()


def test_one_broker_address_keeps_failing_fast() -> None:
    # No standby to wait for with one broker: no waitForReady nor retry policy, a call fails at
    # once while nothing listens. Once the broker has answered, the SDK's interceptor rides
    # through its restart instead (tests/e2e/test_sdk_restart.py).
    replicas = "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert "grpc.service_config" not in dict(broker_channel_options("127.0.0.1:50051"))
    assert "grpc.service_config" in dict(broker_channel_options(replicas))
    assert len(broker_interceptors("127.0.0.1:50051")) == 1
    assert broker_interceptors(replicas) == []


def test_a_fenced_writer_commits_nothing_once_another_broker_leads(database_url: str) -> None:
    """The leadership epoch (Store.lead / Store.fence): the old leader's writes fail, on both
    the hot path (leases only) and the general one (tenants), and nothing of them lands."""
    old, new = Store(database_url), Store(database_url)
    try:
        old.migrate()
        epoch = old.lead()
        old.fence(epoch)
        old.apply([PutTenant(Tenant(TenantName("t1"), 64 * MiB))])
        old.apply([PutLease(lease("l1"))])

        assert new.lead() == epoch + 1
        new.fence(epoch + 1)
        with pytest.raises(StoreFenced, match=r"fenced: another broker leads .* epoch"):
            old.apply([PutLease(lease("l2"))])
        with pytest.raises(StoreFenced, match="fenced"):
            old.apply([PutTenant(Tenant(TenantName("t2"), 64 * MiB))])
        new.apply([PutTenant(Tenant(TenantName("t3"), 64 * MiB))])
        snapshot = new.load()
        assert [t.name for t in snapshot.tenants] == ["t1", "t3"]
        assert [le.lease_id for le in snapshot.active_leases] == ["l1"]
    finally:
        old.close()
        new.close()


# SQLite's writers exclude each other anyway (one write transaction at a time).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_taking_the_epoch_waits_for_a_commit_that_read_the_old_one(database_url: str) -> None:
    old, new = Store(database_url), Store(database_url)
    engine = create_engine(database_url)
    taken: list[int] = []
    try:
        old.migrate()
        epoch = old.lead()
        with engine.connect() as conn:
            # An old leader's transaction between its epoch check and its commit.
            conn.exec_driver_sql(FENCE_SQL)  # what the writer runs first (Store.fence)
            taking = threading.Thread(target=lambda: taken.append(new.lead()))
            taking.start()
            taking.join(1.0)
            assert taking.is_alive() and taken == [], "the epoch was taken under the commit"
            conn.commit()
        taking.join(30)
        assert taken == [epoch + 1]
    finally:
        old.close()
        new.close()
        engine.dispose()


def test_a_sqlite_lock_is_held_until_the_writer_has_exited_too(tmp_path: Path) -> None:
    """The broker hands its writer process the lock's file (child_fds): a standby cannot take
    over while an old leader's writer may still commit, so it need not wait."""
    url = f"sqlite:///{tmp_path}/broker.db"
    lock = lock_for(url)
    assert lock is not None
    assert lock.try_acquire()
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=lock.child_fds(),
    )
    lock.close()  # the broker has died; its writer has not yet
    other = lock_for(url)
    assert other is not None
    try:
        assert not other.try_acquire()
        assert writer.stdin is not None
        writer.stdin.close()
        assert writer.wait(10) == 0
        assert other.try_acquire()
    finally:
        other.close()
