"""The database writer process (broker/writer.py) against a real store on SQLite and PostgreSQL:
the journal's order and read-after-write, one bad submission failing only its caller, commits
held for more decisions only while the event loop is saturated, a killed writer failing what it
had not acknowledged and coming back, a bad database failing start-up, and no writer outliving a
SIGKILLed broker."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agentcg.broker.journal import SAMPLE_S
from agentcg.broker.main import TimedSelector
from agentcg.broker.metrics import BrokerMetrics
from agentcg.broker.model import Lease, LeaseId, NodeId, PutLease, SessionName, TenantName
from agentcg.broker.store import Store, StoreError, StoreIntegrityError
from agentcg.broker.writer import ProcessJournal
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.errors import UnavailableError

from .test_journal import mixed_load, quota_change, read_quotas


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_writes_and_reads_keep_their_order(store: Store, database_url: str) -> None:
    journal = ProcessJournal(store, database_url)
    seen = asyncio.run(mixed_load(journal, store))

    for i, quotas in enumerate(seen):
        step = 5 * i + 4
        assert (quotas["a"], quotas["b"], quotas["c"], quotas["d"]) == (
            1000 + step,
            2000 + step,
            3000 + step,
            4000 + step,
        )
    final = read_quotas(store)
    assert (final["a"], final["b"], final["c"], final["d"]) == (1029, 2029, 3029, 4029)
    assert final["bulk39"] == 27 * 100 + 39
    assert journal.changes == 30 * (3 + 202) + 10 * 40
    assert journal.writer_pid is None  # closed: the child exited


def _negative_lease(n: int) -> PutLease:
    """A lease with a negative budget: the database refuses it (a check constraint)."""
    return PutLease(
        Lease(
            lease_id=LeaseId(f"orphan{n}"),
            tenant=TenantName("good1"),
            session=SessionName("s"),
            command_class="c",
            node_id=NodeId(""),
            memory_bytes=-1,
            intent_memory_bytes=1,
            granted_at_ms=0,
            expires_at_ms=1,
        )
    )


def test_a_bad_submission_fails_only_its_caller(store: Store, database_url: str) -> None:
    async def run() -> list[BaseException | None]:
        journal = ProcessJournal(store, database_url)
        journal.start()
        try:
            # One loop round: the three go to the writer in one frame, one transaction.
            futures = [
                journal.submit([quota_change("good1", 1)]),
                journal.submit([_negative_lease(1)]),
                journal.submit([quota_change("good2", 2)]),
            ]
            results = await asyncio.gather(*futures, return_exceptions=True)
            await journal.commit([quota_change("after", 3)])  # the writer carries on
            return [r if isinstance(r, BaseException) else None for r in results]
        finally:
            await journal.close()

    errors = asyncio.run(run())
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], StoreIntegrityError), errors[1]
    assert str(errors[1]).startswith("apply 1 changes: constraint violated"), errors[1]
    quotas = read_quotas(store)
    assert (quotas["good1"], quotas["good2"], quotas["after"]) == (1, 2, 3)
    assert store.get_lease(LeaseId("orphan1")) is None


def _spread_submissions(
    store: Store, database_url: str, busy_clock: Callable[[], float]
) -> tuple[int, float | None, float | None]:
    """10 submissions 20 ms apart (each its own loop round and frame) to a journal that may hold
    a commit 2 s; (commits, commits held, the loop's busy ratio as sampled)."""
    metrics = BrokerMetrics()

    async def run() -> int:
        journal = ProcessJournal(
            store, database_url, metrics=metrics, hold_s=2.0, busy_clock=busy_clock
        )
        journal.start()
        try:
            await asyncio.sleep(3 * SAMPLE_S)  # the loop sampled
            futures = []
            for i in range(10):
                futures.append(journal.submit([quota_change(f"spread{i}", i)]))
                await asyncio.sleep(0.02)
            await asyncio.gather(*futures)
            return journal.batches
        finally:
            await journal.close()

    commits = asyncio.run(run())
    quotas = read_quotas(store)
    assert [quotas[f"spread{i}"] for i in range(10)] == list(range(10))
    r = metrics.registry
    return (
        commits,
        r.get_sample_value("agentcg_broker_journal_commits_held_total"),
        r.get_sample_value("agentcg_broker_loop_busy_ratio"),
    )


def test_a_saturated_loop_has_the_writer_hold_commits_for_more(
    store: Store, database_url: str
) -> None:
    # A busy clock that runs with the wall clock: a loop busy all the time.
    commits, held, busy = _spread_submissions(store, database_url, time.monotonic)
    assert busy is not None and busy > 0.99
    assert (commits, held) == (1, 1)  # all ten in one transaction, held for the later ones


def test_an_idle_loop_has_its_decisions_committed_at_once(store: Store, database_url: str) -> None:
    commits, held, busy = _spread_submissions(store, database_url, lambda: 0.0)
    assert busy == 0.0
    assert held == 0
    assert commits >= 2  # (10 unless the writer was off the CPU for 20 ms)


def test_the_timed_selector_counts_the_loop_busy_not_waiting() -> None:
    selector = TimedSelector()
    loop = asyncio.SelectorEventLoop(selector)

    async def block() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - the loop busy on purpose

    try:
        start = selector.busy_s()
        loop.run_until_complete(asyncio.sleep(0.3))
        waited = selector.busy_s() - start
        loop.run_until_complete(block())
        blocked = selector.busy_s() - start - waited
    finally:
        loop.close()
    assert waited < 0.1
    assert blocked >= 0.3


async def _commit_then_kill_the_writer(journal: ProcessJournal) -> int:
    """Start ``journal``, commit "before" = 1 through it, SIGKILL its writer; the writer's pid."""
    journal.start()
    await journal.commit([quota_change("before", 1)])
    first = journal.writer_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    return first


def test_the_writer_freezes_its_start_up_state_before_its_first_commit(
    store: Store, database_url: str
) -> None:
    """Its imports (SQLAlchemy, Alembic, a driver: tens of thousands of objects) are moved out of
    its cycle collector's way once its database is open (agentcg.heap), as it reports when
    ready; the parent's own state is not frozen by it."""
    frozen_here = gc.get_freeze_count()

    async def run() -> int:
        journal = ProcessJournal(store, database_url)
        try:
            journal.start()
            await journal.commit([quota_change("x", 1)])
            return journal.writer_frozen_objects
        finally:
            await journal.close()

    assert asyncio.run(run()) > 10_000
    assert gc.get_freeze_count() == frozen_here
    assert read_quotas(store)["x"] == 1


def test_a_killed_writer_fails_what_it_had_not_acknowledged_then_restarts(
    store: Store, database_url: str
) -> None:
    metrics = BrokerMetrics()

    async def run() -> tuple[BaseException | None, int, int]:
        journal = ProcessJournal(store, database_url, metrics=metrics)
        try:
            first = await _commit_then_kill_the_writer(journal)
            lost: BaseException | None = None
            try:
                await journal.commit([quota_change("lost", 2)])
            except StoreError as exc:
                lost = exc
            # A new writer within a few seconds; commits work again.
            deadline = time.monotonic() + 30
            while journal.writer_pid in (None, first) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await journal.commit([quota_change("after", 3)])
            second = journal.writer_pid
            assert second is not None and second != first
            assert journal.writer_frozen_objects > 10_000  # the new writer froze its own
            return lost, journal.restarts, first
        finally:
            await journal.close()

    lost, restarts, first = asyncio.run(run())
    assert isinstance(lost, StoreError) and "writer process exited" in str(lost), lost
    assert restarts == 1
    r = metrics.registry
    assert r.get_sample_value("agentcg_broker_writer_exits_total") == 1
    assert r.get_sample_value("agentcg_broker_writer_restarts_total") == 1
    assert not _alive(first)
    quotas = read_quotas(store)
    assert (quotas["before"], quotas["after"]) == (1, 3)
    assert "lost" not in quotas  # sent to a dead writer: never written


def test_a_restarting_writer_does_not_stop_the_loop(store: Store, database_url: str) -> None:
    """The new writer starts on a thread: the event loop keeps running while it does (here 2 s
    of it, a slow start), and what is submitted meanwhile fails at once instead of waiting."""
    slow = ["/bin/sh", "-c", f'sleep 2; exec "{sys.executable}" -m agentcg.broker.writer']

    async def run() -> tuple[float, BaseException | None]:
        journal = ProcessJournal(store, database_url, command=slow)
        try:
            first = await _commit_then_kill_the_writer(journal)
            while journal.writer_pid == first:
                await asyncio.sleep(0.01)
            refused: BaseException | None = None
            try:
                await journal.commit([quota_change("meanwhile", 2)])
            except StoreError as exc:
                refused = exc
            widest, last = 0.0, time.monotonic()
            deadline = last + 60
            while journal.writer_pid is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                widest, last = max(widest, now - last), now
            await journal.commit([quota_change("after", 3)])
            assert journal.restarts == 1
            return widest, refused
        finally:
            await journal.close()

    widest, refused = asyncio.run(run())
    assert isinstance(refused, StoreError) and "not running" in str(refused), refused
    # A start-up on the loop would stop it for the whole 2 s sleep and more.
    assert widest < 1.0, f"the event loop stood still for {widest:.2f} s during the restart"
    quotas = read_quotas(store)
    assert (quotas["before"], quotas["after"]) == (1, 3)
    assert "meanwhile" not in quotas


def test_closing_during_a_restart_leaves_no_writer(store: Store, database_url: str) -> None:
    slow = ["/bin/sh", "-c", f'sleep 2; exec "{sys.executable}" -m agentcg.broker.writer']

    async def run() -> int:
        journal = ProcessJournal(store, database_url, command=slow)
        journal.start()
        first = journal.writer_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        while journal._launching is None:  # the restart's writer is starting
            await asyncio.sleep(0.01)
        starting = journal._launching.pid
        await journal.close()
        return starting

    starting = asyncio.run(run())
    assert not _alive(starting)


def test_an_unreachable_database_fails_start_up(tmp_path: Path) -> None:
    store = Store(Store.default_url(tmp_path))  # the broker's own, for reads

    async def run() -> None:
        journal = ProcessJournal(store, "postgresql+psycopg://agentcg@127.0.0.1:1/none")
        journal.start()

    try:
        with pytest.raises(StoreError, match="exited with 1 before it was ready"):
            asyncio.run(run())
    finally:
        store.close()


def _children(pid: int) -> list[int]:
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def _cmdline(pid: int) -> bytes:
    """A process's command line; b"" once it is gone (a writer just killed and reaped)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _writers(broker: int) -> list[int]:
    return [c for c in _children(broker) if b"agentcg.broker.writer" in _cmdline(c)]


@pytest.mark.timeout(120)
def test_no_writer_outlives_a_sigkilled_broker(tmp_path: Path, database_url: str) -> None:
    """Neither the first writer nor one started after the first crashed (its start-up runs on
    another thread, but it is started from the loop's: ``PR_SET_PDEATHSIG`` fires when the
    thread that started the child exits)."""
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    with cluster:
        broker = cluster.procs["broker"].pid
        writers = _writers(broker)
        assert len(writers) == 1, writers
        # The database URL (a password, on PostgreSQL) is not on the writer's command line.
        assert database_url.encode() not in Path(f"/proc/{writers[0]}/cmdline").read_bytes()
        os.kill(writers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _writers(broker) in ([], writers) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _writers(broker)
        assert len(second) == 1 and second != writers, (writers, second)
        with Client(cluster.broker_address) as client:
            while True:  # until the second writer is ready and commits
                try:
                    client.set_tenant("t", 1 << 30)
                    break
                except UnavailableError:
                    assert time.monotonic() < deadline, "the second writer never got ready"
                    time.sleep(0.05)
        cluster.stop("broker", sig=signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(second[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(writers[0]) and not _alive(second[0])


def test_frames_carry_every_record_intact() -> None:
    from agentcg.broker.model import (
        Audit,
        AuditEntry,
        DeleteTenant,
        LeaseState,
        Node,
        Outcome,
        PruneHistory,
        PutNode,
        PutTenant,
        Tenant,
    )
    from agentcg.broker.writer import FrameReader, frame

    lease = _negative_lease(7).lease
    records = [
        PutLease(lease),
        PutLease(
            Lease(
                **{
                    **{f: getattr(lease, f) for f in lease.__dataclass_fields__},
                    "state": LeaseState.RELEASED,
                    "outcome": Outcome.KILLED,
                    "ended_at_ms": 9,
                    "idempotency_key": "k",
                }
            )
        ),
        PutTenant(Tenant(TenantName("t"), 5, parent=TenantName("org"))),
        DeleteTenant(TenantName("gone")),
        PutNode(Node(NodeId("n1"), "127.0.0.1:1", 1 << 30, registered_at_ms=4)),
        Audit(AuditEntry(at_ms=3, kind="reserve", tenant="t", lease_id="l")),
        PruneHistory(before_ms=11, limit=12),
    ]
    data = frame((1, [records[:3], records[3:]])) + frame("ready")
    reader = FrameReader()
    # Split anywhere: frames are whole only once all their bytes arrived.
    got = reader.feed(data[:5]) + reader.feed(data[5:40]) + reader.feed(data[40:])
    assert got == [(1, [records[:3], records[3:]]), "ready"]
    assert type(got[0][1][0][1].lease.state) is LeaseState


def test_the_writer_process_does_not_import_grpc() -> None:
    """The writer runs commits only: gRPC's ~10 MB would be resident in it for nothing (a module
    the writer imports once pulled in agentcg.gate: broker_rss_mb 229 against 218 MB)."""
    import subprocess

    code = "import sys, agentcg.broker.writer; print(sorted(m for m in sys.modules if m == 'grpc'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_writer_process_imports_neither_grpc_nor_opentelemetry() -> None:
    """The writer process imports what it commits with (the store, the metrics module), not
    the broker's server stack: OpenTelemetry alone added 13 MB to its resident set once a
    module the metrics import pulled it in."""
    code = (
        "import sys, agentcg.broker.writer; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'opentelemetry'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
