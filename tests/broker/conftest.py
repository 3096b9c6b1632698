"""Database fixtures: every store test runs on SQLite and on PostgreSQL.

PostgreSQL comes from AGENTCG_TEST_POSTGRES_URL (`make test` starts a local server with
scripts/start-postgres.sh and sets it). Without it the PostgreSQL cases skip on a developer
machine and fail under AGENTCG_REQUIRE_KERNEL=1 (CI), like a missing kernel capability.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.broker.store import Store
from sqlalchemy import create_engine, make_url, text

from ..conftest import kernel_missing

POSTGRES_URL = os.environ.get("AGENTCG_TEST_POSTGRES_URL", "")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema in the PostgreSQL test database."""
    if request.param == "sqlite":
        yield Store.default_url(tmp_path)
        return
    if not POSTGRES_URL:
        kernel_missing(
            "PostgreSQL: AGENTCG_TEST_POSTGRES_URL not set "
            "(scripts/start-postgres.sh starts a local server and prints the URL)"
        )
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated store on ``database_url``."""
    store = Store(database_url)
    store.migrate()
    yield store
    store.close()
