"""The broker's persistence adapter: SQLAlchemy 2 over SQLite (default) or PostgreSQL.

The typed mapped classes below are the schema's source of truth; the schema itself is created
and changed only by the Alembic revisions in ``agentcg.migrations`` (``Store.migrate``).

The broker keeps its live state in memory and calls this module from ONE dedicated thread:
``load`` at start-up, then ``apply`` with each batch of ``Change`` records, in one transaction
that is durable when ``apply`` returns (SQLite: WAL with ``synchronous=FULL``; PostgreSQL: the
server's ``synchronous_commit``).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, assert_never

import sqlalchemy.exc as sa_exc
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry

from .model import (
    Audit,
    AuditEntry,
    Change,
    DeleteTenant,
    ForgetPeaks,
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

__all__ = [
    "AUDIT_SCAN_IDS",
    "FENCE_SQL",
    "NAMING_CONVENTION",
    "AuditRow",
    "AuditRows",
    "Base",
    "LeadershipRow",
    "LeaseRow",
    "NodeRow",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreFenced",
    "StoreIntegrityError",
    "TenantRow",
    "alembic_config",
    "create_store_engine",
]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(str(files("agentcg.migrations")))
# The SQLite WAL size past which the writer checkpoints the rest itself between two commits,
# and to which it trims the file (see _Checkpointer).
WAL_LIMIT_BYTES = 64 << 20
# Audit ids one ListAudit page reads at most when no index answers its filters (list_audit).
AUDIT_SCAN_IDS = 100_000

# Stable constraint names, so that Alembic revisions can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class AuditRows(NamedTuple):
    """A page of ``Store.list_audit``: (id, entry) newest first, and where the next one starts."""

    entries: list[tuple[int, AuditEntry]]
    next_before_id: int  # 0: no more


def _enum_values(cls: type[enum.Enum]) -> list[str]:
    return [str(member.value) for member in cls]


def _string_enum(cls: type[enum.Enum], name: str) -> SAEnum:
    """An enum stored as its string value in a VARCHAR with a CHECK (no native ENUM type)."""
    return SAEnum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        values_callable=_enum_values,
        length=16,
        validate_strings=True,
    )


def _nonnegative(*columns: str) -> tuple[CheckConstraint, ...]:
    return tuple(CheckConstraint(f"{c} >= 0", name=f"{c}_nonnegative") for c in columns)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Quantities are bytes, millis and epoch milliseconds: 64 bits everywhere.
    type_annotation_map: ClassVar[dict[type[object], BigInteger | String]] = {
        int: BigInteger(),
        str: String(),
    }


class TenantRow(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(primary_key=True)
    # Deferred: a batch may put a child before its parent; checked at commit.
    parent: Mapped[str | None] = mapped_column(
        ForeignKey("tenants.name", deferrable=True, initially="DEFERRED"), index=True
    )
    memory_quota_bytes: Mapped[int]
    cpu_quota_millis: Mapped[int]
    max_calls: Mapped[int]
    weight: Mapped[int] = mapped_column(server_default=text("1"))

    __table_args__ = _nonnegative("memory_quota_bytes", "cpu_quota_millis", "max_calls")


class NodeRow(Base):
    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(primary_key=True)
    address: Mapped[str]
    memory_capacity_bytes: Mapped[int]
    cpu_capacity_millis: Mapped[int]
    registered_at_ms: Mapped[int]
    cordoned_at_ms: Mapped[int] = mapped_column(server_default=text("0"))
    cordon_reason: Mapped[str] = mapped_column(server_default=text("''"))
    drain_deadline_ms: Mapped[int] = mapped_column(server_default=text("0"))

    __table_args__ = _nonnegative("memory_capacity_bytes", "cpu_capacity_millis")


# The predicate of the partial indexes on active leases, written out as a literal in every query
# meant to use them: PostgreSQL's generic plan of a prepared statement (psycopg prepares a query
# it sees often) cannot match a partial index against a bound ``state = $1`` and scans the table.
_ACTIVE_LEASES = f"state = '{LeaseState.ACTIVE.value}'"


def _active_index(name: str, *columns: str) -> Index:
    """An index of the active leases only."""
    where = text(_ACTIVE_LEASES)
    return Index(name, *columns, sqlite_where=where, postgresql_where=where)


class LeaseRow(Base):
    """One lease, active or ended. No foreign keys: the history outlives tenants and nodes."""

    __tablename__ = "leases"

    lease_id: Mapped[str] = mapped_column(primary_key=True)
    tenant: Mapped[str]
    session: Mapped[str]
    command_class: Mapped[str]
    node_id: Mapped[str]
    memory_bytes: Mapped[int]
    intent_memory_bytes: Mapped[int]
    granted_at_ms: Mapped[int]
    expires_at_ms: Mapped[int]
    state: Mapped[LeaseState] = mapped_column(_string_enum(LeaseState, "lease_state"))
    epoch: Mapped[int]
    priority: Mapped[int]
    cpu_millis: Mapped[int]
    idempotency_key: Mapped[str]
    ended_at_ms: Mapped[int | None]
    peak_memory_bytes: Mapped[int]
    outcome: Mapped[Outcome] = mapped_column(_string_enum(Outcome, "outcome"))
    session_max_memory_bytes: Mapped[int] = mapped_column(server_default=text("0"))
    session_class: Mapped[str] = mapped_column(server_default=text("''"))
    session_peak_bytes: Mapped[int] = mapped_column(server_default=text("0"))

    # A release changes ``state`` and columns no index holds. An index keyed on ``state`` took a
    # delete and an insert per release; one kept to the active leases takes a delete (0006).
    # The active ones end with the listings' whole order (``lease_id`` too, 0011), which makes
    # each cheaper than the full index beside it whatever order SQLite holds them in.
    __table_args__ = (
        Index("ix_leases_granted_at_ms", "granted_at_ms"),
        Index("ix_leases_tenant_granted_at_ms", "tenant", "granted_at_ms"),
        _active_index("ix_leases_active", "granted_at_ms", "lease_id"),
        _active_index("ix_leases_active_tenant", "tenant", "granted_at_ms", "lease_id"),
        _active_index("ix_leases_active_node_id", "node_id", "granted_at_ms", "lease_id"),
        *_nonnegative(
            "memory_bytes",
            "intent_memory_bytes",
            "cpu_millis",
            "peak_memory_bytes",
            "session_max_memory_bytes",
            "session_peak_bytes",
        ),
    )


class LeadershipRow(Base):
    """One row: the epoch of the broker that leads (migration 0007; ``Store.fence``)."""

    __tablename__ = "leadership"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int]


class AuditRow(Base):
    __tablename__ = "audit"

    # INTEGER PRIMARY KEY is SQLite's rowid alias (autoincrementing); BIGINT elsewhere.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    at_ms: Mapped[int]
    kind: Mapped[str]
    tenant: Mapped[str]
    lease_id: Mapped[str] = mapped_column(index=True)
    node_id: Mapped[str]
    detail: Mapped[str] = mapped_column(Text())


class SizingResetRow(Base):
    """When sizing last forgot a (tenant, command class): peaks of leases ended at or before
    it are not learned from (``ForgetPeaks``, migration 0009)."""

    __tablename__ = "sizing_resets"

    tenant: Mapped[str] = mapped_column(primary_key=True)
    command_class: Mapped[str] = mapped_column(primary_key=True)
    forgotten_at_ms: Mapped[int]


class SessionSizingResetRow(Base):
    """When session sizing last forgot an (organization, session class): sessions of the
    organization's tenants that ended at or before it are not learned from (migration 0012)."""

    __tablename__ = "session_sizing_resets"

    organization: Mapped[str] = mapped_column(primary_key=True)
    session_class: Mapped[str] = mapped_column(primary_key=True)
    forgotten_at_ms: Mapped[int]


def _table(row: type[Base]) -> Table:
    table = row.__table__
    assert isinstance(table, Table)
    return table


_TENANTS = _table(TenantRow)
_NODES = _table(NodeRow)
_LEASES = _table(LeaseRow)
_LEADERSHIP = _table(LeadershipRow)
# A fenced writer's first statement in each transaction (``Store.fence``); PostgreSQL's form.
FENCE_SQL = "SELECT epoch FROM leadership WHERE id = 1 FOR SHARE"
_AUDIT = _table(AuditRow)
_SIZING_RESETS = _table(SizingResetRow)
_SESSION_SIZING_RESETS = _table(SessionSizingResetRow)


class StoreError(Exception):
    """The database is unreachable or unusable (down, locked, disconnected, not migrated).

    Nothing of the failed call was written; retrying later may succeed.
    """


class StoreFenced(StoreError):
    """Another broker took the leadership epoch (``Store.fence``): this one leads no longer.
    Nothing of the failed call was written, and nothing of this broker's will be."""


class StoreIntegrityError(Exception):
    """A batch broke a schema constraint or held a value a column cannot store.

    A broker bug, not retryable; nothing of the batch was written.
    """


@dataclass(frozen=True, slots=True)
class Snapshot:
    tenants: list[Tenant]
    nodes: list[Node]
    active_leases: list[Lease]


def create_store_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite connections get WAL, ``synchronous=FULL``, a busy timeout,
    foreign keys, and real (SQLAlchemy-emitted) BEGINs so that reads and DDL are transactional.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            # The sqlite3 module's legacy transaction control skips BEGIN for SELECT and DDL;
            # turn it off and let the "begin" hook below emit BEGIN instead.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "busy_timeout=5000",
                "foreign_keys=ON",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    raise ValueError(f"unsupported database URL {parsed!r}: expected sqlite or postgresql")


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    """An Alembic configuration for our migrations; with ``connection``, env.py runs on it."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser escaping
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def _translated(action: str, url: str) -> Iterator[None]:
    """Turn SQLAlchemy's errors into the store's two exceptions."""
    try:
        yield
    except (sa_exc.IntegrityError, sa_exc.DataError) as e:
        raise StoreIntegrityError(f"{action}: constraint violated: {e.orig}") from e
    except sa_exc.DBAPIError as e:
        # Unreachable, locked, disconnected, or the schema is missing ("no such table" is an
        # OperationalError on SQLite, a ProgrammingError on PostgreSQL).
        raise StoreError(f"{action}: database {url} unavailable: {e.orig}") from e
    except (sa_exc.DisconnectionError, sa_exc.TimeoutError) as e:
        raise StoreError(f"{action}: database {url} unavailable: {e}") from e


@dataclass(slots=True)
class _Batch:
    """A batch of changes reduced to the final state per key (the last change of a key wins)."""

    tenants: dict[str, Tenant | None]  # None: deleted
    nodes: dict[str, Node]
    leases: dict[str, Lease]
    audit: list[AuditEntry]
    prunes: list[PruneHistory]
    # (sessions, tenant or organization, command or session class): forgotten at
    resets: dict[tuple[bool, str, str], int]

    @classmethod
    def of(cls, changes: Sequence[Change]) -> _Batch:
        batch = cls({}, {}, {}, [], [], {})
        for change in changes:
            match change:
                case PutTenant(tenant=tenant):
                    batch.tenants[tenant.name] = tenant
                case DeleteTenant(name=name):
                    batch.tenants[name] = None
                case PutNode(node=node):
                    batch.nodes[node.node_id] = node
                case PutLease(lease=lease):
                    batch.leases[lease.lease_id] = lease
                case Audit(entry=entry):
                    batch.audit.append(entry)
                case PruneHistory():
                    batch.prunes.append(change)
                case ForgetPeaks(tenant=t, command_class=c, at_ms=at_ms, sessions=sessions):
                    batch.resets[(sessions, t, c)] = at_ms
                case _:
                    assert_never(change)
        return batch


_COLUMNS: dict[type, tuple[str, ...]] = {
    record: tuple(f.name for f in fields(record)) for record in (Tenant, Node, Lease, AuditEntry)
}


def _values(record: Tenant | Node | Lease | AuditEntry) -> dict[str, object]:
    """Column values of a record: the columns are named as the record's fields."""
    return {column: getattr(record, column) for column in _COLUMNS[type(record)]}


_LEASE_COLUMNS = _COLUMNS[Lease]
# What a lease's later versions may change (release, renew, grow, expiry); the rest is fixed at
# grant, and leaving it out of the upsert's SET spares SQLite the index updates on those columns.
_LEASE_MUTABLE = (
    "memory_bytes",
    "expires_at_ms",
    "state",
    "epoch",
    "ended_at_ms",
    "peak_memory_bytes",
    "outcome",
    "session_peak_bytes",
)
_AUDIT_COLUMNS = _COLUMNS[AuditEntry]
assert _LEASE_COLUMNS[0] == "lease_id"
# Most rows per multi-row INSERT (a power of two): 20 lease columns x 256 stays well under
# SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
_ROWS_PER_STATEMENT = 256


def _lease_row(le: Lease) -> tuple[object, ...]:
    """A lease as DBAPI parameters in ``_LEASE_COLUMNS`` order (enums as their stored values)."""
    return (
        le.lease_id,
        le.tenant,
        le.session,
        le.command_class,
        le.node_id,
        le.memory_bytes,
        le.intent_memory_bytes,
        le.granted_at_ms,
        le.expires_at_ms,
        le.state.value,
        le.epoch,
        le.priority,
        le.cpu_millis,
        le.idempotency_key,
        le.ended_at_ms,
        le.peak_memory_bytes,
        le.outcome.value,
        le.session_max_memory_bytes,
        le.session_class,
        le.session_peak_bytes,
    )


def _audit_row(e: AuditEntry) -> tuple[object, ...]:
    return (e.at_ms, e.kind, e.tenant, e.lease_id, e.node_id, e.detail)


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(
        name=TenantName(row.name),
        memory_quota_bytes=row.memory_quota_bytes,
        parent=None if row.parent is None else TenantName(row.parent),
        cpu_quota_millis=row.cpu_quota_millis,
        max_calls=row.max_calls,
        weight=row.weight,
    )


def _node(row: NodeRow) -> Node:
    return Node(
        node_id=NodeId(row.node_id),
        address=row.address,
        memory_capacity_bytes=row.memory_capacity_bytes,
        cpu_capacity_millis=row.cpu_capacity_millis,
        registered_at_ms=row.registered_at_ms,
        cordoned_at_ms=row.cordoned_at_ms,
        cordon_reason=row.cordon_reason,
        drain_deadline_ms=row.drain_deadline_ms,
    )


def _lease(row: LeaseRow) -> Lease:
    return Lease(
        lease_id=LeaseId(row.lease_id),
        tenant=TenantName(row.tenant),
        session=SessionName(row.session),
        command_class=row.command_class,
        node_id=NodeId(row.node_id),
        memory_bytes=row.memory_bytes,
        intent_memory_bytes=row.intent_memory_bytes,
        granted_at_ms=row.granted_at_ms,
        expires_at_ms=row.expires_at_ms,
        state=row.state,
        epoch=row.epoch,
        priority=row.priority,
        cpu_millis=row.cpu_millis,
        idempotency_key=row.idempotency_key,
        ended_at_ms=row.ended_at_ms,
        peak_memory_bytes=row.peak_memory_bytes,
        outcome=row.outcome,
        session_max_memory_bytes=row.session_max_memory_bytes,
        session_class=row.session_class,
        session_peak_bytes=row.session_peak_bytes,
    )


def _audit_entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        at_ms=row.at_ms,
        kind=row.kind,
        tenant=row.tenant,
        lease_id=row.lease_id,
        node_id=row.node_id,
        detail=row.detail,
    )


class _Checkpointer:
    """SQLite WAL checkpoints off the commit path, and a WAL that stays bounded.

    By default the connection whose commit takes the WAL past 1,000 pages copies the WAL back
    into the database file (and fsyncs it) inside that commit: every few hundred group commits
    one waits for a checkpoint, and the decisions in it with it. The writer turns that off
    (``wal_autocheckpoint=0``); this thread, on its own connection, runs PASSIVE checkpoints
    (which never block the writer) every ``interval_s``.

    The writer restarts the WAL from its start only once every frame in it has been copied. A
    PASSIVE checkpoint copies the frames that were there when it began, and under steady load
    commits land while it runs: at 1,000 Reserve/s a single checkpoint per round never caught
    up, and the WAL grew ~35 MiB/s for as long as the load lasted (each commit then also grew the
    file, which makes its fdatasync write the inode too). So a round repeats the checkpoint
    while frames keep arriving, up to ``ROUNDS`` times, which catches up in the gaps between
    commits. If the WAL still passes ``limit_bytes`` (a writer that never pauses), ``behind``
    asks the writer to copy the rest itself between two commits (``Store._catch_up``): no
    commit can land during that one, and its ``journal_size_limit`` trims the file back.
    """

    ROUNDS = 8

    def __init__(
        self, engine: Engine, wal: Path, interval_s: float = 0.2, limit_bytes: int = WAL_LIMIT_BYTES
    ) -> None:
        self._engine = engine
        self.wal = wal
        self._interval_s = interval_s
        self.limit_bytes = limit_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames = 0  # in the WAL at the last checkpoint
        self.checkpoints = 0
        self.restarts = 0  # times the WAL was seen restarted from its start
        self.behind = False  # the WAL passed the limit: the writer should catch up

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="agentcg-db-checkpoint", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        raw = None
        while not self._stop.wait(self._interval_s):
            try:
                if raw is None:
                    raw = self._engine.raw_connection()
                self._round(raw.cursor())
            except Exception:  # noqa: BLE001 - the next round retries; commits are unaffected
                logger.warning("WAL checkpoint failed", exc_info=True)
                if raw is not None:
                    raw.invalidate()
                    raw = None
        if raw is not None:
            raw.close()

    def _round(self, cursor: DBAPICursor) -> None:
        last = -1
        for _ in range(self.ROUNDS):
            frames = self._passive(cursor)
            if frames <= last:
                # Nothing was committed during the last one (the writer restarts the WAL at
                # its next commit), or the writer has restarted it already.
                break
            last = frames
        try:
            self.behind = self.wal.stat().st_size > self.limit_bytes
        except FileNotFoundError:
            self.behind = False

    def _passive(self, cursor: DBAPICursor) -> int:
        """One PASSIVE checkpoint; the frames in the WAL when it began (-1: not in WAL mode)."""
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        row = cursor.fetchone()
        assert row is not None
        frames = int(row[1])  # (busy, frames in the WAL, frames copied)
        self.checkpoints += 1
        if 0 <= frames < self._frames:
            self.restarts += 1
        self._frames = frames
        return frames

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class Store:
    """The broker's database. Not thread-safe: use it from one thread.

    ``wal_limit_bytes``: SQLite only, the WAL size the writer may reach (see _Checkpointer)."""

    def __init__(self, url: str, *, wal_limit_bytes: int = WAL_LIMIT_BYTES) -> None:
        parsed = make_url(url)
        sqlite_file = parsed.get_backend_name() == "sqlite" and not self.in_memory(url)
        if sqlite_file:
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
        self._url = url
        self._shown_url = parsed.render_as_string(hide_password=True)
        self._engine = create_store_engine(url)
        self._dialect = parsed.get_backend_name()
        # load() reads three tables; on PostgreSQL make them one snapshot (SQLite's BEGIN is one).
        self._snapshot_engine = (
            self._engine.execution_options(isolation_level="REPEATABLE READ")
            if self._dialect == "postgresql"
            else self._engine
        )
        self._writer: Connection | None = None
        self._checkpoints = (
            _Checkpointer(self._engine, Path(f"{parsed.database}-wal"), limit_bytes=wal_limit_bytes)
            if sqlite_file
            else None
        )
        self.wal_catch_ups = 0  # checkpoints the writer ran itself (_catch_up)
        self._upserts = {
            table.name: self._upsert(table)
            for table in (_TENANTS, _NODES, _LEASES, _SIZING_RESETS, _SESSION_SIZING_RESETS)
        }
        self._mark = "?" if self._dialect == "sqlite" else "%s"
        self._lease_upsert_sql = self._lease_upsert(1)
        self._audit_insert_sql = self._audit_insert(1)
        # Multi-row statements by row count (see _write_leases), built on first use.
        self._lease_upserts: dict[int, str] = {}
        self._audit_inserts: dict[int, str] = {}
        self._epoch: int | None = None  # fenced to this leadership epoch (``fence``)

    @property
    def wal_path(self) -> Path | None:
        """The SQLite WAL file of this database (None on PostgreSQL or in memory)."""
        return self._checkpoints.wal if self._checkpoints is not None else None

    def _rows_sql(self, columns: Sequence[str], rows: int) -> str:
        one = f"({', '.join(self._mark for _ in columns)})"
        return ", ".join(one for _ in range(rows))

    def _lease_upsert(self, rows: int) -> str:
        return (
            f"INSERT INTO leases ({', '.join(_LEASE_COLUMNS)}) "
            f"VALUES {self._rows_sql(_LEASE_COLUMNS, rows)} "
            "ON CONFLICT (lease_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in _LEASE_MUTABLE)
        )

    def _audit_insert(self, rows: int) -> str:
        return (
            f"INSERT INTO audit ({', '.join(_AUDIT_COLUMNS)}) "
            f"VALUES {self._rows_sql(_AUDIT_COLUMNS, rows)}"
        )

    @staticmethod
    def _multi_row(
        cache: dict[int, str], build: Callable[[int], str], rows: list[tuple[object, ...]]
    ) -> Iterator[tuple[str, list[object]]]:
        """``rows`` as statements of 2**k rows each, largest first (13 rows: 8 + 4 + 1), so
        that at most ~10 distinct statements per table are ever prepared and cached."""
        start = 0
        while start < len(rows):
            n = min(_ROWS_PER_STATEMENT, 1 << ((len(rows) - start).bit_length() - 1))
            sql = cache.get(n)
            if sql is None:
                sql = cache[n] = build(n)
            yield sql, [v for row in rows[start : start + n] for v in row]
            start += n

    @classmethod
    def default_url(cls, data_dir: Path) -> str:
        return f"sqlite:///{data_dir / 'broker.db'}"

    def _upsert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """INSERT ... ON CONFLICT (primary key) DO UPDATE every other column."""
        key = [c.name for c in table.primary_key.columns]
        if self._dialect == "sqlite":
            lite = sqlite.insert(table)
            return lite.on_conflict_do_update(
                index_elements=key,
                set_={c.name: lite.excluded[c.name] for c in table.columns if not c.primary_key},
            )
        pg = postgresql.insert(table)
        return pg.on_conflict_do_update(
            index_elements=key,
            set_={c.name: pg.excluded[c.name] for c in table.columns if not c.primary_key},
        )

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (``alembic upgrade head``)."""
        with _translated("migrate", self._shown_url), self._engine.begin() as conn:
            command.upgrade(alembic_config(self._url, conn), "head")
        logger.info("database %s migrated to head", self._shown_url)

    def load(self) -> Snapshot:
        """All tenants and nodes, and the active leases, read in one transaction."""
        with _translated("load", self._shown_url), Session(self._snapshot_engine) as session:
            tenants = session.scalars(select(TenantRow).order_by(TenantRow.name))
            snapshot_tenants = [_tenant(r) for r in tenants]
            nodes = session.scalars(select(NodeRow).order_by(NodeRow.node_id))
            snapshot_nodes = [_node(r) for r in nodes]
            leases = session.scalars(
                select(LeaseRow)
                .where(text(_ACTIVE_LEASES))
                .order_by(LeaseRow.granted_at_ms, LeaseRow.lease_id)
            )
            return Snapshot(snapshot_tenants, snapshot_nodes, [_lease(r) for r in leases])

    def lead(self) -> int:
        """Take the leadership epoch: add one to it and return it. Waits for every commit that
        read the old epoch (``fence``) to end; the ones that start after it fail."""
        with _translated("take the leadership epoch", self._shown_url), self._engine.begin() as c:
            epoch = c.execute(
                update(_LEADERSHIP)
                .where(_LEADERSHIP.c.id == 1)
                .values(epoch=_LEADERSHIP.c.epoch + 1)
                .returning(_LEADERSHIP.c.epoch)
            ).scalar_one()
        return int(epoch)

    def fence(self, epoch: int) -> None:
        """Commit only while the leadership epoch is ``epoch``: every write transaction first
        reads it (``FOR SHARE``: ``lead`` waits for the transaction) and fails with
        ``StoreFenced`` once another broker has taken it."""
        self._epoch = epoch

    def _check_epoch(self, cursor: DBAPICursor) -> None:
        """Inside a write transaction (see ``fence``): raise unless it is still ours."""
        # SQLite has no FOR SHARE, nor needs it: a transaction that read and then writes after
        # another connection's commit fails (SQLITE_BUSY_SNAPSHOT).
        cursor.execute(
            FENCE_SQL if self._dialect == "postgresql" else FENCE_SQL[: -len(" FOR SHARE")]
        )
        self._verify_epoch(cursor.fetchone())

    def _verify_epoch(self, row: Sequence[Any] | None) -> None:
        if row is None or row[0] != self._epoch:
            now = None if row is None else row[0]
            raise StoreFenced(
                f"fenced: another broker leads {self._shown_url} now (leadership epoch {now}, "
                f"this broker's {self._epoch}); nothing committed"
            )

    def apply(self, changes: Sequence[Change]) -> None:
        """Persist a batch of changes in one transaction: all or nothing, durable on return.

        The result is that of applying the changes in order: a batch is reduced to the last
        change per tenant, node and lease, and audit entries are appended in order. A lease's
        identity (tenant, session, class, node, intent, grant time, priority, CPU, key) is fixed
        when it is first written; later versions change only ``_LEASE_MUTABLE``.
        """
        if not changes:
            return
        batch = _Batch.of(changes)
        deleted = [name for name, tenant in batch.tenants.items() if tenant is None]
        tenants = [_values(t) for t in batch.tenants.values() if t is not None]
        action = f"apply {len(changes)} changes"
        try:
            if not (batch.tenants or batch.nodes or batch.prunes or batch.resets):
                self._write_leases(action, batch)
            else:
                with _translated(action, self._shown_url):
                    conn = self._writer_connection()
                    with conn.begin():
                        self._write(conn, batch, deleted, tenants)
        except (StoreError, StoreIntegrityError):
            self._drop_writer()
            raise
        if self._checkpoints is not None and self._checkpoints.behind:
            self._catch_up()

    def _catch_up(self) -> None:
        """Checkpoint the rest of the WAL on the writer's own connection, between two commits
        (see _Checkpointer): the next commit restarts the WAL from its start. The batch before
        is already durable; a failure here is only logged."""
        assert self._checkpoints is not None and self._writer is not None
        self._checkpoints.behind = False
        raw = self._writer.connection.dbapi_connection
        assert raw is not None
        try:
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except self._engine.dialect.loaded_dbapi.Error:
            logger.warning("WAL checkpoint on the writer failed", exc_info=True)
            return
        self.wal_catch_ups += 1

    def _write_leases(self, action: str, batch: _Batch) -> None:
        """The hot path (admissions, releases, growth, expiry): leases and audit only, in one
        transaction driven on the driver connection itself. Per batch this saves SQLAlchemy's
        execution machinery for BEGIN, two statements and COMMIT, which at low load (a batch
        per request) costs more than the statements."""
        with _translated(action, self._shown_url):
            raw = self._writer_connection().connection.dbapi_connection
        assert raw is not None
        dbapi = self._engine.dialect.loaded_dbapi
        leases = [_lease_row(le) for le in batch.leases.values()]
        audit = [_audit_row(e) for e in batch.audit]
        cursor = raw.cursor()
        try:
            if self._dialect == "sqlite":
                cursor.execute("BEGIN")  # the sqlite3 module runs in autocommit mode here
            if self._epoch is not None and self._dialect == "sqlite":
                self._check_epoch(cursor)
            if self._dialect == "sqlite":
                # A few multi-row statements per table, not an executemany of one per row: the
                # sqlite3 driver lets go of the GIL around every statement it steps, and each
                # time the database thread then queues for the GIL behind the event loop (up
                # to the switch interval), so a batch must cost a handful of statements.
                upserts = self._multi_row(self._lease_upserts, self._lease_upsert, leases)
                inserts = self._multi_row(self._audit_inserts, self._audit_insert, audit)
                for sql, params in (*upserts, *inserts):
                    cursor.execute(sql, params)
            else:
                # psycopg pipelines an executemany of one prepared statement; multi-row
                # statements measured twice its CPU per row there (ReserveBatch+ReleaseBatch).
                # The epoch check (``fence``) goes in the same pipeline: no round trip of its
                # own (150 us a commit here); a wrong epoch rolls the writes back below.
                fence = raw.cursor() if self._epoch is not None else None
                with raw.pipeline():
                    if fence is not None:
                        fence.execute(FENCE_SQL)
                    if leases:
                        cursor.executemany(self._lease_upsert_sql, leases)
                    if audit:
                        cursor.executemany(self._audit_insert_sql, audit)
                if fence is not None:
                    row = fence.fetchone()
                    fence.close()
                    self._verify_epoch(row)
            if self._dialect == "sqlite":
                cursor.execute("COMMIT")
            else:
                raw.commit()
        except (dbapi.IntegrityError, dbapi.DataError) as e:
            self._rollback(raw)
            raise StoreIntegrityError(f"{action}: constraint violated: {e}") from e
        except dbapi.Error as e:
            self._rollback(raw)
            raise StoreError(f"{action}: database {self._shown_url} unavailable: {e}") from e
        except StoreError:  # fenced
            self._rollback(raw)
            raise
        finally:
            cursor.close()

    def _rollback(self, raw: DBAPIConnection) -> None:
        try:
            if self._dialect == "sqlite":
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
            else:
                raw.rollback()
        except Exception:  # noqa: BLE001 - the connection is dropped next anyway
            logger.debug("rollback failed", exc_info=True)

    @staticmethod
    def in_memory(url: str) -> bool:
        """An SQLite database of this process's alone (no file)."""
        parsed = make_url(url)
        return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")

    def open_writer(self) -> None:
        """Open the connection writes use now (it is otherwise opened by the first write), so
        that an unreachable database is an error at start-up."""
        with _translated("open the database for writing", self._shown_url):
            self._writer_connection()

    def _writer_connection(self) -> Connection:
        """The connection every write batch uses: held open, so that a batch costs no pool
        checkout and reset (a round trip on PostgreSQL). Reopened after a failure."""
        if self._writer is None or self._writer.closed or self._writer.invalidated:
            self._writer = self._engine.connect()
            if self._dialect == "sqlite" and self._checkpoints is not None:
                # Checkpoints run on the checkpointer's connection, never inline in a commit.
                self._writer.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
                limit = self._checkpoints.limit_bytes
                self._writer.exec_driver_sql(f"PRAGMA journal_size_limit={limit}")
                self._writer.commit()
                self._checkpoints.start()
        return self._writer

    def _drop_writer(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except sa_exc.SQLAlchemyError:
                pass
            self._writer = None

    def _write(
        self, conn: Connection, batch: _Batch, deleted: list[str], tenants: list[dict[str, object]]
    ) -> None:
        if self._epoch is not None:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            with closing(raw.cursor()) as cursor:
                self._check_epoch(cursor)
        if deleted:
            conn.execute(delete(_TENANTS).where(_TENANTS.c.name.in_(deleted)))
        if tenants:
            conn.execute(self._upserts[_TENANTS.name], tenants)
        if batch.nodes:
            nodes = [_values(n) for n in batch.nodes.values()]
            conn.execute(self._upserts[_NODES.name], nodes)
        # The hot path (every admission and release): plain DBAPI executemany of tuples
        # with SQL prepared once, which skips SQLAlchemy's per-row parameter processing.
        if batch.leases:
            conn.exec_driver_sql(
                self._lease_upsert_sql, [_lease_row(le) for le in batch.leases.values()]
            )
        if batch.audit:
            conn.exec_driver_sql(self._audit_insert_sql, [_audit_row(e) for e in batch.audit])
        resets = [
            {"tenant": t, "command_class": c, "forgotten_at_ms": at}
            for (sessions, t, c), at in batch.resets.items()
            if not sessions
        ]
        if resets:
            conn.execute(self._upserts[_SIZING_RESETS.name], resets)
        session_resets = [
            {"organization": o, "session_class": c, "forgotten_at_ms": at}
            for (sessions, o, c), at in batch.resets.items()
            if sessions
        ]
        if session_resets:
            conn.execute(self._upserts[_SESSION_SIZING_RESETS.name], session_resets)
        for prune in batch.prunes:
            self._prune(conn, prune)

    @staticmethod
    def _prune(conn: Connection, prune: PruneHistory) -> None:
        """Both deletes read a bounded range of an index, whatever the tables' size: ended
        leases by grant time (``ix_leases_granted_at_ms``), audit entries by id, from the
        oldest (ids grow with time), among the oldest ``limit`` ids only."""
        leases = (
            select(_LEASES.c.lease_id)
            .where(
                _LEASES.c.granted_at_ms < prune.before_ms,
                _LEASES.c.state != LeaseState.ACTIVE,
            )
            .order_by(_LEASES.c.granted_at_ms)
            .limit(prune.limit)
        )
        gone = conn.execute(delete(_LEASES).where(_LEASES.c.lease_id.in_(leases))).rowcount
        oldest = select(func.min(_AUDIT.c.id)).scalar_subquery()
        entries = conn.execute(
            delete(_AUDIT).where(
                _AUDIT.c.id < oldest + prune.limit, _AUDIT.c.at_ms < prune.before_ms
            )
        ).rowcount
        if gone or entries:
            logger.debug(
                "history: deleted %d ended leases and %d audit entries before %d",
                gone,
                entries,
                prune.before_ms,
            )

    def recent_peaks(self, *, limit: int = 20_000) -> list[tuple[TenantName, str, int]]:
        """(tenant, command class, peak) of the newest ``limit`` ended leases that reported a
        peak, oldest first: what sizing learns from after a restart (not those ended before
        their class was last forgotten)."""
        reset = SizingResetRow
        query = (
            select(LeaseRow.tenant, LeaseRow.command_class, LeaseRow.peak_memory_bytes)
            .outerjoin(
                reset,
                (reset.tenant == LeaseRow.tenant) & (reset.command_class == LeaseRow.command_class),
            )
            .where(
                LeaseRow.state != LeaseState.ACTIVE,
                LeaseRow.peak_memory_bytes > 0,
                reset.forgotten_at_ms.is_(None) | (LeaseRow.ended_at_ms > reset.forgotten_at_ms),
            )
            .order_by(LeaseRow.ended_at_ms.desc(), LeaseRow.lease_id.desc())
            .limit(limit)
        )
        with _translated("read peaks", self._shown_url), Session(self._engine) as session:
            rows = session.execute(query).all()
        return [(TenantName(t), c, p) for t, c, p in reversed(rows)]

    def recent_session_peaks(self, *, limit: int = 20_000) -> list[tuple[TenantName, str, int]]:
        """(tenant, session class, peak) of the newest ``limit`` sessions of a class that ended
        (on the lease that ended each one), oldest first: what session sizing learns from after
        a restart (not those that ended before their class was last forgotten in their
        organization, the tenant's top-level ancestor)."""
        query = (
            select(
                LeaseRow.tenant,
                LeaseRow.session_class,
                LeaseRow.session_peak_bytes,
                LeaseRow.ended_at_ms,
            )
            .where(LeaseRow.session_peak_bytes > 0, LeaseRow.state != LeaseState.ACTIVE)
            .order_by(LeaseRow.ended_at_ms.desc(), LeaseRow.lease_id.desc())
            .limit(limit)
        )
        reset = SessionSizingResetRow
        with _translated("read session peaks", self._shown_url), Session(self._engine) as s:
            rows = s.execute(query).all()
            resets = {
                (o, c): at
                for o, c, at in s.execute(
                    select(reset.organization, reset.session_class, reset.forgotten_at_ms)
                )
            }
            parents = {n: p for n, p in s.execute(select(TenantRow.name, TenantRow.parent))}

        def org(tenant: str) -> str:
            for _ in range(len(parents)):  # at most one step per tenant, cycles or not
                parent = parents.get(tenant)
                if parent is None:
                    break
                tenant = parent
            return tenant

        return [
            (TenantName(t), c, p)
            for t, c, p, ended_at_ms in reversed(rows)
            if not resets or (ended_at_ms or 0) > resets.get((org(t), c), -1)
        ]

    def get_lease(self, lease_id: LeaseId) -> Lease | None:
        with _translated(f"get lease {lease_id}", self._shown_url), Session(self._engine) as s:
            row = s.get(LeaseRow, lease_id)
            return None if row is None else _lease(row)

    def list_leases(
        self,
        *,
        tenant: str = "",
        node_id: str = "",
        include_inactive: bool = False,
        limit: int = 1000,
        tenants: Collection[str] | None = None,
    ) -> list[Lease]:
        """Leases by grant time (oldest first), filtered by tenant and node when given, and to
        those of ``tenants`` (a caller's scope) when that is not None."""
        query = select(LeaseRow)
        if tenant:
            query = query.where(LeaseRow.tenant == tenant)
        if tenants is not None:
            if not tenants:
                return []
            query = query.where(LeaseRow.tenant.in_(sorted(tenants)))
        if node_id:
            query = query.where(LeaseRow.node_id == node_id)
        if not include_inactive:
            query = query.where(text(_ACTIVE_LEASES))
        query = query.order_by(LeaseRow.granted_at_ms, LeaseRow.lease_id).limit(limit)
        with _translated("list leases", self._shown_url), Session(self._engine) as session:
            return [_lease(r) for r in session.scalars(query)]

    def audit(self, *, lease_id: str = "", limit: int = 1000) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (of one lease when given), oldest first."""
        query = select(AuditRow)
        if lease_id:
            query = query.where(AuditRow.lease_id == lease_id)
        query = query.order_by(AuditRow.id.desc()).limit(limit)
        with _translated("read audit", self._shown_url), Session(self._engine) as session:
            return [_audit_entry(r) for r in reversed(session.scalars(query).all())]

    def list_audit(
        self,
        *,
        tenants: Sequence[str] | None = None,
        node_id: str = "",
        lease_id: str = "",
        kind: str = "",
        since_ms: int = 0,
        before_id: int = 0,
        limit: int = 100,
        scan_ids: int = AUDIT_SCAN_IDS,
    ) -> AuditRows:
        """Audit entries, newest first, with their ids: of ``tenants`` (None: any tenant or
        none), a node, a lease, a kind, at or after ``since_ms``, with an id below
        ``before_id`` (0: from the newest), at most ``limit``; and the ``before_id`` of the
        next page (0: no more).

        Only a lease's entries are indexed. The other filters read the table newest first, at
        most ``scan_ids`` ids per call: a page that has not filled by then ends there, maybe
        empty, and the next one goes on below. A rare tenant, kind or node among a million
        entries took 40-58 ms in one read on SQLite, on the thread every read waits for, and a
        table kept 30 days at 1,000 calls a minute holds tens of millions. Indexes on (tenant,
        id), (kind, id) and (node_id, id) made those reads 0.4-0.8 ms, but each grant then
        wrote three more pages: in 7 alternating pairs of ``agentcg bench admission`` runs,
        Reserve at 1,000/s was slower with them in every pair (p50 1.04-1.27 against
        0.81-1.13 ms, p99 2.50-2.89 against 2.34-2.59 ms), so the hot path keeps its cost and
        the rare read pays its own, a bounded slice at a time.

        With ``since_ms``, the walk ends at the first entry below the slice older than it:
        entries are written in time order (a leader's clock that stepped back could end it
        early)."""
        query = select(AuditRow)
        if tenants is not None:
            if not tenants:  # none in view: nothing to walk through
                return AuditRows([], 0)
            query = query.where(AuditRow.tenant.in_(tenants))
        if node_id:
            query = query.where(AuditRow.node_id == node_id)
        if lease_id:
            query = query.where(AuditRow.lease_id == lease_id)
        if kind:
            query = query.where(AuditRow.kind == kind)
        if since_ms:
            query = query.where(AuditRow.at_ms >= since_ms)
        if before_id:
            query = query.where(AuditRow.id < before_id)
        with _translated("read audit", self._shown_url), Session(self._engine) as session:
            floor = 0  # the slice's lowest id; 0: every id below before_id
            if not lease_id:
                top = before_id or (session.scalar(select(func.max(AuditRow.id))) or 0) + 1
                floor = max(top - scan_ids, 0)
                query = query.where(AuditRow.id >= floor)
            query = query.order_by(AuditRow.id.desc()).limit(limit)
            rows = [(r.id, _audit_entry(r)) for r in session.scalars(query).all()]
            if len(rows) == limit:
                return AuditRows(rows, rows[-1][0])
            if not floor:
                return AuditRows(rows, 0)
            # The next entry down: none, or one older than since_ms, ends the walk.
            below = session.scalar(
                select(AuditRow.at_ms)
                .where(AuditRow.id < floor)
                .order_by(AuditRow.id.desc())
                .limit(1)
            )
            done = below is None or below < since_ms
            return AuditRows(rows, 0 if done else floor)

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self._drop_writer()
        self._engine.dispose()
