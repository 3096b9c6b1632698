"""The store against real databases migrated with Alembic: SQLite always, PostgreSQL when
AGENTCG_TEST_POSTGRES_URL is set (scripts/start-postgres.sh starts one and prints the URL).
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from agentcg.broker.model import (
    Audit,
    AuditEntry,
    Change,
    DeleteTenant,
    Lease,
    LeaseId,
    LeaseState,
    Node,
    NodeId,
    Outcome,
    PruneHistory,
    PutLease,
    PutNode,
    PutTenant,
    SessionName,
    Tenant,
    TenantName,
)
from agentcg.broker.store import (
    AUDIT_SCAN_IDS,
    AuditRow,
    LeaseRow,
    NodeRow,
    Snapshot,
    Store,
    StoreError,
    StoreIntegrityError,
    TenantRow,
    _Checkpointer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event


def tenant(name: str, memory_quota_bytes: int = 8 << 30, **kw: object) -> Tenant:
    return Tenant(TenantName(name), memory_quota_bytes, **kw)  # type: ignore[arg-type]


def node(node_id: str = "n1", **kw: object) -> Node:
    defaults: dict[str, object] = {"address": f"{node_id}:7000", "memory_capacity_bytes": 64 << 30}
    return Node(NodeId(node_id), **(defaults | kw))  # type: ignore[arg-type]


def lease(lease_id: str, **kw: object) -> Lease:
    defaults: dict[str, object] = {
        "tenant": TenantName("t1"),
        "session": SessionName("s1"),
        "command_class": "pytest",
        "node_id": NodeId("n1"),
        "memory_bytes": 1 << 30,
        "intent_memory_bytes": 1 << 30,
        "granted_at_ms": 1_000,
        "expires_at_ms": 61_000,
    }
    return Lease(LeaseId(lease_id), **(defaults | kw))  # type: ignore[arg-type]


def everything(store: Store) -> tuple[Snapshot, list[Lease], list[AuditEntry]]:
    return store.load(), store.list_leases(include_inactive=True), store.audit()


# --- round trips of each change kind ---------------------------------------------------------


def test_put_tenant_round_trips(store: Store) -> None:
    parent = tenant("org", 64 << 30, cpu_quota_millis=16_000, max_calls=100)
    # A child may come before its parent in a batch: the foreign key is checked at commit.
    child = tenant("org/team", 8 << 30, parent=TenantName("org"), cpu_quota_millis=2_000)
    store.apply([PutTenant(child), PutTenant(parent)])
    assert store.load().tenants == [parent, child]

    bigger = dataclasses.replace(child, memory_quota_bytes=16 << 30, max_calls=3)
    store.apply([PutTenant(bigger)])
    assert store.load().tenants == [parent, bigger]


def test_delete_tenant_deletes_the_row(store: Store) -> None:
    store.apply([PutTenant(tenant("a")), PutTenant(tenant("b"))])
    store.apply([DeleteTenant(TenantName("a")), DeleteTenant(TenantName("never-existed"))])
    assert [t.name for t in store.load().tenants] == ["b"]


def test_deleting_a_parent_with_children_fails_and_writes_nothing(store: Store) -> None:
    store.apply([PutTenant(tenant("org")), PutTenant(tenant("org/a", parent=TenantName("org")))])
    with pytest.raises(StoreIntegrityError, match="apply 2 changes"):
        store.apply([DeleteTenant(TenantName("org")), PutNode(node("n1"))])
    snapshot = store.load()
    assert [t.name for t in snapshot.tenants] == ["org", "org/a"]
    assert snapshot.nodes == []


def test_put_node_round_trips(store: Store) -> None:
    n1 = node("n1", cpu_capacity_millis=8_000, registered_at_ms=1_700_000_000_000)
    n2 = node("n2")
    store.apply([PutNode(n2), PutNode(n1)])
    assert store.load().nodes == [n1, n2]

    moved = dataclasses.replace(n1, address="10.0.0.9:7000", memory_capacity_bytes=128 << 30)
    store.apply([PutNode(moved)])
    assert store.load().nodes == [moved, n2]


def test_put_lease_round_trips_every_field(store: Store) -> None:
    granted = lease(
        "l-1",
        memory_bytes=3 << 30,
        intent_memory_bytes=2 << 30,
        epoch=3,
        priority=-5,
        cpu_millis=1_500,
        idempotency_key="req-42",
        peak_memory_bytes=(3 << 30) - 1,
        granted_at_ms=1_700_000_000_123,
        expires_at_ms=1_700_000_060_123,
    )
    store.apply([PutLease(granted)])
    assert store.get_lease(LeaseId("l-1")) == granted
    assert store.load().active_leases == [granted]

    ended = dataclasses.replace(
        granted,
        state=LeaseState.RELEASED,
        ended_at_ms=1_700_000_030_000,
        outcome=Outcome.COMPLETED,
        epoch=4,
    )
    store.apply([PutLease(ended)])
    assert store.get_lease(LeaseId("l-1")) == ended
    assert store.get_lease(LeaseId("missing")) is None


@pytest.mark.parametrize("state", list(LeaseState))
@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_lease_state_and_outcome_round_trips(
    store: Store, state: LeaseState, outcome: Outcome
) -> None:
    stored = lease("l-1", state=state, outcome=outcome)
    store.apply([PutLease(stored)])
    assert store.get_lease(LeaseId("l-1")) == stored


def test_audit_entries_append_in_order(store: Store) -> None:
    entries = [
        AuditEntry(at_ms=5, kind="reserve", tenant="t1", lease_id="l-1", node_id="n1"),
        AuditEntry(at_ms=5, kind="grow", tenant="t1", lease_id="l-1", detail='{"to": 2}'),
        AuditEntry(at_ms=4, kind="tenant_set", tenant="t2"),
    ]
    store.apply([Audit(e) for e in entries[:2]])
    store.apply([Audit(entries[2])])
    assert store.audit() == entries


# --- batches -----------------------------------------------------------------------------------


def test_a_batch_reads_as_if_applied_in_order(store: Store) -> None:
    v1, v2 = lease("l-1"), lease("l-1", memory_bytes=2 << 30, epoch=2)
    store.apply(
        [
            PutLease(v1),
            Audit(AuditEntry(1, "reserve", lease_id="l-1")),
            PutTenant(tenant("gone")),
            PutLease(v2),
            DeleteTenant(TenantName("gone")),
            DeleteTenant(TenantName("back")),
            PutTenant(tenant("back", 1)),
            PutNode(node("n1", address="old")),
            PutNode(node("n1", address="new")),
            Audit(AuditEntry(2, "grow", lease_id="l-1")),
        ]
    )
    snapshot = store.load()
    assert snapshot.active_leases == [v2]
    assert snapshot.tenants == [tenant("back", 1)]
    assert [n.address for n in snapshot.nodes] == ["new"]
    assert [e.kind for e in store.audit()] == ["reserve", "grow"]


def test_apply_of_nothing_is_a_no_op(store: Store) -> None:
    store.apply([])
    assert everything(store) == (Snapshot([], [], []), [], [])


@pytest.mark.parametrize(
    "bad",
    [
        PutLease(lease("l-bad", memory_bytes=-1)),
        PutTenant(tenant("t-bad", -1)),
        PutTenant(tenant("orphan", parent=TenantName("no-such-parent"))),
        PutNode(node("n-bad", cpu_capacity_millis=-1)),
    ],
    ids=["lease-negative-memory", "tenant-negative-quota", "tenant-unknown-parent", "node"],
)
def test_apply_is_atomic(store: Store, bad: Change) -> None:
    store.apply([PutTenant(tenant("t0")), PutLease(lease("l-0"))])
    before = everything(store)
    batch: list[Change] = [
        PutTenant(tenant("t1")),
        PutNode(node("n1")),
        PutLease(lease("l-1")),
        PutLease(dataclasses.replace(lease("l-0"), state=LeaseState.RELEASED)),
        DeleteTenant(TenantName("t0")),
        Audit(AuditEntry(1, "reserve", tenant="t1", lease_id="l-1")),
        bad,
    ]
    with pytest.raises(StoreIntegrityError, match="constraint violated"):
        store.apply(batch)
    assert everything(store) == before

    # The store is usable after the failure.
    store.apply(batch[:-1])
    assert [le.lease_id for le in store.load().active_leases] == ["l-1"]


def test_a_large_batch_in_one_transaction(store: Store) -> None:
    leases = [lease(f"l-{i:04d}", granted_at_ms=i) for i in range(600)]
    audit = [AuditEntry(i, "reserve", lease_id=f"l-{i:04d}") for i in range(600)]
    store.apply([c for pair in zip(map(PutLease, leases), map(Audit, audit)) for c in pair])
    assert store.load().active_leases == leases
    assert store.audit(limit=10_000) == audit


def test_sqlite_checkpoints_run_off_the_commit_path(tmp_path: Path) -> None:
    """The writer never checkpoints inside a commit; the checkpointer thread copies the WAL
    back into the database file, so the WAL does not keep growing."""
    url = Store.default_url(tmp_path)
    store = Store(url)
    store.migrate()
    try:
        store.apply([PutLease(lease("l-0"))])
        raw = store._writer_connection().connection.dbapi_connection
        assert raw is not None
        assert raw.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for i in range(1, 1500):  # ~10 WAL pages each: well past the default 1,000-page mark
            store.apply([PutLease(lease(f"l-{i}")), Audit(AuditEntry(i, "reserve"))])
        checkpointer = store._checkpoints
        assert checkpointer is not None
        seen = checkpointer.checkpoints
        for _ in range(500):  # liveness, not timing: wait for a round after the writes
            if checkpointer.checkpoints >= seen + 2:
                break
            time.sleep(0.02)
        assert checkpointer.checkpoints >= seen + 2
        db = sqlite3.connect(tmp_path / "broker.db")
        for _ in range(100):  # busy: the checkpointer's own round runs at this instant
            busy, wal_frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy:
                break
            time.sleep(0.01)
        db.close()
        assert busy == 0 and wal_frames == copied  # nothing was left for this checkpoint
        assert len(store.load().active_leases) == 1500
    finally:
        store.close()


def _commit_steadily(store: Store, wal: Path, count: int, pause_s: float) -> int:
    """``count`` commits of a lease and an audit entry (~30 kB of WAL each), ``pause_s`` apart;
    the largest the WAL file was seen."""
    biggest = 0
    for i in range(count):
        store.apply([PutLease(lease(f"l-{i}")), Audit(AuditEntry(i, "reserve"))])
        if pause_s:
            time.sleep(pause_s)
        biggest = max(biggest, wal.stat().st_size)
    return biggest


@contextmanager
def _wal_store(tmp_path: Path, **kwargs: int) -> Iterator[tuple[Store, _Checkpointer]]:
    """A store on an SQLite file whose checkpointer runs every 20 ms."""
    store = Store(Store.default_url(tmp_path), **kwargs)
    store.migrate()
    try:
        checkpointer = store._checkpoints
        assert checkpointer is not None
        checkpointer._interval_s = 0.02  # before the first write starts it
        assert store.wal_path == tmp_path / "broker.db-wal"
        yield store, checkpointer
    finally:
        store.close()


def test_sqlite_wal_restarts_under_steady_commits(tmp_path: Path) -> None:
    """Commits landing during each checkpoint (as at ~1,500 Reserve/s) still let the writer
    restart the WAL: the checkpointer repeats its checkpoint until one runs between two
    commits. With one checkpoint per round the file grew with every commit until the writer's
    own catch-up at the limit (64 MiB, 1-2 restarts); with the rounds it peaks at 14-28 MiB on a
    quiet host (5 runs), and 33 MiB was seen in a busy CI run."""
    with _wal_store(tmp_path) as (store, checkpointer):
        biggest = _commit_steadily(store, checkpointer.wal, 3000, 0.0003)
        assert checkpointer.restarts >= 3
        assert biggest < 48 << 20, f"the WAL reached {biggest >> 20} MiB"
        assert len(store.load().active_leases) == 3000


def test_sqlite_wal_stays_bounded_under_a_writer_that_never_pauses(tmp_path: Path) -> None:
    """A writer that commits back to back gives a checkpoint no gap to catch up in: once the
    WAL passes the limit, the writer copies the rest itself between two commits."""
    with _wal_store(tmp_path, wal_limit_bytes=1 << 20) as (store, checkpointer):
        biggest = _commit_steadily(store, checkpointer.wal, 3000, 0.0)
        assert store.wal_catch_ups >= 1
        assert biggest < 8 << 20, f"the WAL reached {biggest >> 20} MiB"
        assert len(store.load().active_leases) == 3000


# --- reads -------------------------------------------------------------------------------------


def test_load_returns_only_active_leases(store: Store) -> None:
    active = [lease("l-a", granted_at_ms=2), lease("l-b", granted_at_ms=1)]
    ended = [
        lease("l-r", state=LeaseState.RELEASED, ended_at_ms=9, outcome=Outcome.COMPLETED),
        lease("l-e", state=LeaseState.EXPIRED, ended_at_ms=9),
        lease("l-k", state=LeaseState.REVOKED, ended_at_ms=9, outcome=Outcome.KILLED),
    ]
    store.apply([PutLease(le) for le in active + ended])
    assert store.load().active_leases == [active[1], active[0]]  # by grant time


def test_list_leases_filters(store: Store) -> None:
    leases = [
        lease("l-1", tenant=TenantName("t1"), node_id=NodeId("n1"), granted_at_ms=1),
        lease("l-2", tenant=TenantName("t1"), node_id=NodeId("n2"), granted_at_ms=2),
        lease("l-3", tenant=TenantName("t2"), node_id=NodeId("n1"), granted_at_ms=3),
        lease(
            "l-4",
            tenant=TenantName("t1"),
            node_id=NodeId("n1"),
            granted_at_ms=4,
            state=LeaseState.EXPIRED,
        ),
    ]
    store.apply([PutLease(le) for le in reversed(leases)])

    def ids(**kw: object) -> list[str]:
        return [le.lease_id for le in store.list_leases(**kw)]  # type: ignore[arg-type]

    assert ids() == ["l-1", "l-2", "l-3"]
    assert ids(include_inactive=True) == ["l-1", "l-2", "l-3", "l-4"]
    assert ids(tenant="t1") == ["l-1", "l-2"]
    assert ids(tenant="t1", include_inactive=True) == ["l-1", "l-2", "l-4"]
    assert ids(node_id="n1") == ["l-1", "l-3"]
    assert ids(tenant="t1", node_id="n1", include_inactive=True) == ["l-1", "l-4"]
    assert ids(tenant="nobody") == []
    assert ids(include_inactive=True, limit=2) == ["l-1", "l-2"]
    # A caller's scope: the limit counts only leases in it.
    assert ids(tenants={"t2"}, limit=1) == ["l-3"]
    assert ids(tenants={"t1", "t2"}, node_id="n1") == ["l-1", "l-3"]
    assert ids(tenants=set()) == []


def test_active_lease_reads_use_the_active_lease_indexes(tmp_path: Path) -> None:
    """The start-up load and the active listings read the partial indexes on active leases
    (migrations 0006, 0011), not the whole history, ended leases included."""
    url = Store.default_url(tmp_path)
    store = Store(url)
    store.migrate()
    store.apply([PutLease(lease("l-1")), PutLease(_ended("l-0", granted_at_ms=500))])
    reads: list[tuple[str, object]] = []

    def record(
        _conn: object, _cursor: object, sql: str, params: object, _ctx: object, _many: bool
    ) -> None:
        if sql.lstrip().startswith("SELECT") and "FROM leases" in sql:
            reads.append((sql, params))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        assert [le.lease_id for le in store.load().active_leases] == ["l-1"]
        assert [le.lease_id for le in store.list_leases()] == ["l-1"]
        assert [le.lease_id for le in store.list_leases(tenant="t1")] == ["l-1"]
        assert [le.lease_id for le in store.list_leases(node_id="n1")] == ["l-1"]
    finally:
        event.remove(Engine, "before_cursor_execute", record)
        store.close()
    path = url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as db:
        plans = [
            " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in reads
        ]
    used = [re.findall(r"USING INDEX (\w+)", plan) for plan in plans]
    assert used == [
        ["ix_leases_active"],
        ["ix_leases_active"],
        ["ix_leases_active_tenant"],
        ["ix_leases_active_node_id"],
    ], plans
    # The indexes hold the whole order (0011): no sort of ties after the read, and nothing that
    # makes the full index beside each one as cheap (which one SQLite took then followed the
    # order the indexes were created in).
    assert not [plan for plan in plans if "TEMP B-TREE" in plan], plans


def test_audit_filters_by_lease_and_keeps_the_newest(store: Store) -> None:
    entries = [AuditEntry(i, "grow", lease_id=f"l-{i % 3}") for i in range(10)]
    store.apply([Audit(e) for e in entries])
    assert store.audit() == entries
    assert store.audit(lease_id="l-1") == [e for e in entries if e.lease_id == "l-1"]
    assert store.audit(lease_id="l-1", limit=2) == [entries[4], entries[7]]
    assert store.audit(limit=3) == entries[-3:]
    assert store.audit(lease_id="l-9") == []


def _walk_audit(
    store: Store, *, limit: int, scan_ids: int, before_id: int = 0, **filters: Any
) -> tuple[list[tuple[int, AuditEntry]], int]:
    """Pages of ``list_audit`` from ``before_id`` until ``limit`` entries or the end, as a
    caller walks them; each page checked to lie in its slice. Returns the entries and the
    number of pages."""
    top = max((i for i, _ in store.list_audit(limit=1).entries), default=0) + 1
    out: list[tuple[int, AuditEntry]] = []
    pages = 0
    before = before_id
    while len(out) < limit:
        page = store.list_audit(
            before_id=before, limit=limit - len(out), scan_ids=scan_ids, **filters
        )
        pages += 1
        high = before or top
        low = 0 if filters.get("lease_id") else high - scan_ids
        assert all(low <= i < high for i, _ in page.entries), (page, low, high)
        assert 0 <= page.next_before_id < high
        out.extend(page.entries)
        before = page.next_before_id
        if not before:
            break
    return out, pages


def test_audit_listing_by_every_filter_is_the_newest_that_match(store: Store) -> None:
    """``list_audit``, page after page, against a plain filter of the same entries, for each
    combination of its filters: a caller's tenants (one, several, none), kind, node, since,
    before and limit; in slices of 7 ids (pages come back short or empty) and of the default."""
    entries = [
        AuditEntry(
            1000 + i,
            ("reserve", "release", "kill")[i * 7 % 3 if i % 5 else 2],
            tenant=f"t{i * 13 % 5}",
            lease_id=f"l-{i}",
            node_id=f"n{i * 3 % 4}",
        )
        for i in range(300)
    ]
    store.apply([Audit(e) for e in entries])
    numbered = list(zip(range(1, len(entries) + 1), entries, strict=True))
    assert [i for i, _ in store.list_audit(limit=1).entries] == [300]  # ids count from 1 here
    checked = 0
    for tenants in (None, [], ["t0"], ["t1", "t3"], ["t4", "t0", "t2", "t1", "t3"], ["nobody"]):
        for kind in ("", "kill"):
            for node_id in ("", "n2"):
                for since_ms, before_id in ((0, 0), (1100, 0), (0, 150)):
                    for limit in (1, 7, 1000):
                        want = [
                            (i, e)
                            for i, e in reversed(numbered)
                            if (tenants is None or e.tenant in tenants)
                            and (not kind or e.kind == kind)
                            and (not node_id or e.node_id == node_id)
                            and e.at_ms >= since_ms
                            and (not before_id or i < before_id)
                        ][:limit]
                        for scan_ids in (7, AUDIT_SCAN_IDS):
                            got, _ = _walk_audit(
                                store,
                                tenants=tenants,
                                kind=kind,
                                node_id=node_id,
                                since_ms=since_ms,
                                before_id=before_id,
                                limit=limit,
                                scan_ids=scan_ids,
                            )
                            case = (tenants, kind, node_id, since_ms, before_id, limit, scan_ids)
                            assert got == want, case
                        checked += bool(want)
    assert checked == 4 * 2 * 2 * 3 * 3  # all but those of no tenant match some entries


def test_an_audit_walk_reads_slices_and_stops_below_since(store: Store) -> None:
    """A rare match among many entries comes back after pages that are short or empty, each
    a slice of at most ``scan_ids`` ids; a walk with ``since_ms`` ends at the first entry
    older than it instead of reading on to the oldest; a lease's entries come in one page."""
    entries = [
        AuditEntry(1000 + i, "kill" if i in (3, 250) else "reserve", lease_id=f"l-{i % 7}")
        for i in range(300)
    ]
    store.apply([Audit(e) for e in entries])
    page = store.list_audit(kind="kill", scan_ids=10)
    assert page.entries == [] and page.next_before_id == 291
    got, pages = _walk_audit(store, kind="kill", limit=100, scan_ids=10)
    assert [i for i, _ in got] == [251, 4]
    assert pages == 30  # every slice down to the oldest: the kill at id 4 is there
    got, pages = _walk_audit(store, kind="kill", since_ms=1200, limit=100, scan_ids=10)
    assert [i for i, _ in got] == [251]
    assert pages == 10  # slices 291-300 .. 201-210; then id 200 (at 1199) is older than since
    got, pages = _walk_audit(store, lease_id="l-3", limit=1000, scan_ids=10)
    assert [i for i, _ in got] == list(range(298, 0, -7)) and pages == 1
    # A caller with no tenant in view (or one that does not exist): nothing to walk through.
    assert store.list_audit(tenants=[], scan_ids=10) == ([], 0)


# --- durability and errors ---------------------------------------------------------------------


def test_reopened_store_has_the_data(database_url: str) -> None:
    first = Store(database_url)
    first.migrate()
    first.apply(
        [
            PutTenant(tenant("t1")),
            PutNode(node("n1")),
            PutLease(lease("l-1")),
            Audit(AuditEntry(1, "reserve", lease_id="l-1")),
        ]
    )
    expected = everything(first)
    first.close()

    second = Store(database_url)
    second.migrate()  # already at head: a no-op
    try:
        assert everything(second) == expected
        assert expected[0].active_leases == [lease("l-1")]
    finally:
        second.close()


def test_store_works_from_another_thread(store: Store) -> None:
    # The broker migrates at start-up, then uses the store from one dedicated DB thread.
    with ThreadPoolExecutor(1) as db_thread:
        db_thread.submit(store.apply, [PutLease(lease("l-1"))]).result()
        assert db_thread.submit(store.load).result().active_leases == [lease("l-1")]


def test_sqlite_connections_are_durable_wal(tmp_path: Path) -> None:
    store = Store(Store.default_url(tmp_path))
    try:
        store.migrate()
        with store._engine.connect() as conn:  # checking the connect hook
            pragmas = {
                p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert pragmas == {
            "journal_mode": "wal",
            "synchronous": 2,  # FULL
            "busy_timeout": 5000,
            "foreign_keys": 1,
        }
        assert (tmp_path / "broker.db").is_file()
    finally:
        store.close()


def test_default_url_is_a_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    assert Store.default_url(tmp_path / "var") == f"sqlite:///{tmp_path}/var/broker.db"
    store = Store(Store.default_url(tmp_path / "var" / "new"))  # creates the directory
    store.close()
    assert (tmp_path / "var" / "new").is_dir()


def test_unmigrated_database_raises_store_error(database_url: str) -> None:
    store = Store(database_url)
    try:
        with pytest.raises(StoreError, match="load: database .* unavailable"):
            store.load()
    finally:
        store.close()


def test_unreachable_database_raises_store_error() -> None:
    # Nothing listens on port 1; the password must not appear in the message.
    store = Store("postgresql+psycopg://agentcg:s3cret@127.0.0.1:1/agentcg?connect_timeout=2")
    try:
        with pytest.raises(StoreError, match="unavailable") as raised:
            store.apply([PutNode(node())])
        assert "s3cret" not in str(raised.value)
        with pytest.raises(StoreError):
            store.migrate()
    finally:
        store.close()


def test_rows_have_a_column_per_record_field() -> None:
    # apply() writes records by field name; the read side is typed field by field.
    pairs = [(TenantRow, Tenant), (NodeRow, Node), (LeaseRow, Lease), (AuditRow, AuditEntry)]
    for row, record in pairs:
        columns = {c.name for c in row.__table__.columns} - {"id"}
        assert columns == {f.name for f in dataclasses.fields(record)}, row.__tablename__


# --- property: one batch == the same changes one by one ----------------------------------------

_names = st.sampled_from(["a", "b", "c"])
_changes = st.one_of(
    st.builds(lambda n, q: PutTenant(tenant(n, q)), _names, st.integers(0, 1 << 40)),
    st.builds(lambda n: DeleteTenant(TenantName(n)), _names),
    st.builds(lambda n, a: PutNode(node(n, address=a)), _names, st.text(max_size=5)),
    st.builds(
        lambda n, m, s: PutLease(lease(n, memory_bytes=m, state=s)),
        _names,
        st.integers(0, 1 << 40),
        st.sampled_from(LeaseState),
    ),
    st.builds(lambda n, k: Audit(AuditEntry(1, k, lease_id=n)), _names, st.text(max_size=5)),
)


@settings(max_examples=30, deadline=None)
@given(st.lists(_changes, max_size=25))
def test_one_batch_equals_one_change_at_a_time(changes: list[Change]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        batched, stepped = Store.default_url(Path(tmp, "a")), Store.default_url(Path(tmp, "b"))
        stores = Store(batched), Store(stepped)
        try:
            for store in stores:
                store.migrate()
            stores[0].apply(changes)
            for change in changes:
                stores[1].apply([change])
            assert everything(stores[0]) == everything(stores[1])
        finally:
            for store in stores:
                store.close()


# --- history retention -----------------------------------------------------------------------


def _ended(lease_id: str, granted_at_ms: int) -> Lease:
    return lease(
        lease_id,
        granted_at_ms=granted_at_ms,
        state=LeaseState.RELEASED,
        ended_at_ms=granted_at_ms + 10,
        outcome=Outcome.COMPLETED,
    )


def _entry(at_ms: int, lease_id: str) -> Audit:
    return Audit(AuditEntry(at_ms=at_ms, kind="release", tenant="t1", lease_id=lease_id))


def test_pruning_deletes_old_history_and_nothing_live(store: Store) -> None:
    old_active = lease("old-active", granted_at_ms=100, expires_at_ms=10**12)
    store.apply(
        [
            PutLease(old_active),
            *(PutLease(_ended(f"old{i}", 200 + i)) for i in range(5)),
            PutLease(_ended("new", 5_000)),
            *(_entry(300 + i, f"old{i}") for i in range(5)),
            _entry(6_000, "new"),
        ]
    )

    # A batch at a time, oldest grant first; the active lease stays whatever its age.
    store.apply([PruneHistory(before_ms=1_000, limit=2)])
    assert [le.lease_id for le in store.list_leases(include_inactive=True)] == [
        "old-active",
        "old2",
        "old3",
        "old4",
        "new",
    ]
    assert [e.lease_id for e in store.audit()] == ["old2", "old3", "old4", "new"]

    store.apply([PruneHistory(before_ms=1_000, limit=2)])
    store.apply([PruneHistory(before_ms=1_000, limit=2)])
    assert [le.lease_id for le in store.list_leases(include_inactive=True)] == [
        "old-active",
        "new",
    ]
    assert [e.lease_id for e in store.audit()] == ["new"]
    assert store.load().active_leases == [old_active]

    # Nothing old enough is left: a round deletes nothing, and newer history stays.
    store.apply([PruneHistory(before_ms=1_000, limit=2)])
    assert [e.lease_id for e in store.audit()] == ["new"]
    assert store.get_lease(LeaseId("new")) is not None


def test_pruning_in_a_batch_with_decisions(store: Store) -> None:
    """A prune shares its transaction with whatever the round decided."""
    store.apply([PutLease(_ended("old", 100)), _entry(100, "old")])
    fresh = lease("fresh", granted_at_ms=50)  # older than the cutoff, but active
    store.apply([PutLease(fresh), _entry(50, "fresh"), PruneHistory(before_ms=1_000, limit=10)])
    assert store.list_leases(include_inactive=True) == [fresh]
    # Audit entries are history whatever lease they are about: the new one was old enough.
    assert store.audit() == []
