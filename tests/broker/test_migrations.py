"""Alembic migrations: every revision round-trips, and head matches the mapped classes.

SQLite always; PostgreSQL when AGENTCG_TEST_POSTGRES_URL is set (scripts/start-postgres.sh).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from agentcg.broker.store import (
    MIGRATIONS_DIR,
    Base,
    Store,
    alembic_config,
    create_store_engine,
)
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, inspect, text
from sqlalchemy.exc import IntegrityError

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "tenants",
    "nodes",
    "leases",
    "audit",
    "leadership",
    "sizing_resets",
    "session_sizing_resets",
}


def run_alembic(url: str, action: Callable[[Config], None]) -> None:
    """Run an Alembic command as Store.migrate does: on our connection, in one transaction."""
    engine = create_store_engine(url)
    try:
        with engine.begin() as conn:
            action(alembic_config(url, conn))
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    run_alembic(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str = "base") -> None:
    run_alembic(url, lambda config: command.downgrade(config, revision))


def tables(url: str) -> set[str]:
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def schema_diff(url: str, metadata: MetaData = Base.metadata) -> list[object]:
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_one_head_named_by_its_revision() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_heads() == ["0012"]
    for revision in script.walk_revisions():
        assert Path(revision.path).name.startswith(f"{revision.revision}_")


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    upgrade(database_url)
    assert tables(database_url) == TABLES
    assert current_revision(database_url) == "0012"

    downgrade(database_url)
    assert tables(database_url) == set()
    assert current_revision(database_url) is None

    upgrade(database_url)
    assert tables(database_url) == TABLES
    assert schema_diff(database_url) == []


def test_every_revision_round_trips(database_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(database_url))
    for revision in reversed(list(script.walk_revisions())):  # oldest first
        previous = revision.down_revision
        assert previous is None or isinstance(previous, str), "no merge revisions yet"
        upgrade(database_url, revision.revision)
        downgrade(database_url, previous or "base")
        assert current_revision(database_url) == previous
        upgrade(database_url, revision.revision)
        assert current_revision(database_url) == revision.revision


def test_migrated_schema_matches_the_mapped_classes(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.migrate()
    finally:
        store.close()
    assert schema_diff(database_url) == []


def test_schema_diff_sees_drift(tmp_path: Path) -> None:
    # The empty diff above means something: a column missing from the database shows up.
    url = Store.default_url(tmp_path)
    upgrade(url)
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["leases"].append_column(Column("added_later", Integer, nullable=True))
    diff = schema_diff(url, drifted)
    assert [d[0] for d in diff if isinstance(d, tuple)] == ["add_column"]


def test_schema_rejects_unknown_enum_values(database_url: str) -> None:
    upgrade(database_url)
    engine = create_store_engine(database_url)
    try:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO leases VALUES ('l', 't', 's', 'c', 'n', 1, 1, 0, 1, 'bogus',"
                    " 1, 0, 0, '', NULL, 0, '', 0, '', 0)"
                )
            )
    finally:
        engine.dispose()


def test_alembic_command_line_with_the_repo_ini(tmp_path: Path) -> None:
    url = Store.default_url(tmp_path)

    def alembic(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"url={url}"]
            + list(args),
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr
        return done.stdout

    alembic("upgrade", "head")
    assert "0012 (head)" in alembic("current")
    assert tables(url) == TABLES
    alembic("downgrade", "base")
    assert tables(url) == set()


def test_migrations_live_in_the_package() -> None:
    assert MIGRATIONS_DIR == REPO / "migrations"
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()


def test_0002_gives_existing_tenants_weight_1_and_downgrades_keeping_them(
    database_url: str,
) -> None:
    upgrade(database_url, "0001")
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tenants (name, parent, memory_quota_bytes, cpu_quota_millis,"
                    " max_calls) VALUES ('org', NULL, 1024, 0, 0)"
                )
            )
        upgrade(database_url, "0002")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT weight FROM tenants")).scalar_one() == 1
        downgrade(database_url, "0001")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT name FROM tenants")).scalar_one() == "org"
    finally:
        engine.dispose()


def test_0006_indexes_the_active_leases_already_there(database_url: str) -> None:
    """Leases written at 0005 (with its columns: the store of today writes the later ones too)
    are found through 0006's active-lease indexes, and are all there after a downgrade."""
    upgrade(database_url, "0005")
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as conn:
            for lease_id, state in (("l-active", "active"), ("l-ended", "expired")):
                conn.execute(
                    text(
                        "INSERT INTO leases (lease_id, tenant, session, command_class, node_id,"
                        " memory_bytes, intent_memory_bytes, granted_at_ms, expires_at_ms, state,"
                        " epoch, priority, cpu_millis, idempotency_key, ended_at_ms,"
                        " peak_memory_bytes, outcome, session_max_memory_bytes) VALUES (:id,"
                        " 't1', 's1', 'pytest', 'n1', 1073741824, 1073741824, 1000, 61000,"
                        " :state, 1, 0, 0, '', NULL, 0, '', 0)"
                    ),
                    {"id": lease_id, "state": state},
                )
        upgrade(database_url)
        store = Store(database_url)
        try:
            assert [le.lease_id for le in store.load().active_leases] == ["l-active"]
            assert [le.lease_id for le in store.list_leases(tenant="t1")] == ["l-active"]
            assert [le.lease_id for le in store.list_leases(node_id="n1")] == ["l-active"]
        finally:
            store.close()
        downgrade(database_url, "0005")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT lease_id, state FROM leases ORDER BY lease_id"))
            assert [tuple(r) for r in rows] == [("l-active", "active"), ("l-ended", "expired")]
    finally:
        engine.dispose()
