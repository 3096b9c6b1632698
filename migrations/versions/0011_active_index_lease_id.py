"""The partial indexes of active leases end with ``lease_id``, the listings' last sort key.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

Active leases are read in ``granted_at_ms, lease_id`` order. With the indexes of 0006 ending at
``granted_at_ms``, a tenant's active listing cost SQLite's planner the same through the partial
``ix_leases_active_tenant`` as through the full ``ix_leases_tenant_granted_at_ms`` (both sort
ties in a temporary B-tree), and which one it took followed the order the indexes were created
in, which 0010's table copy on SQLite left to chance: half the time a tenant's active leases
were read from its whole history. Ending the partial indexes with ``lease_id`` serves the whole
order from them, so each is cheaper than its full counterpart whatever the creation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = sa.text("state = 'active'")
_ACTIVE_INDEXES = {
    "ix_leases_active": ["granted_at_ms"],
    "ix_leases_active_tenant": ["tenant", "granted_at_ms"],
    "ix_leases_active_node_id": ["node_id", "granted_at_ms"],
}


def _recreate(tail: list[str]) -> None:
    for name, columns in _ACTIVE_INDEXES.items():
        op.drop_index(name, table_name="leases")
        op.create_index(
            name, "leases", [*columns, *tail], sqlite_where=_ACTIVE, postgresql_where=_ACTIVE
        )


def upgrade() -> None:
    _recreate(["lease_id"])


def downgrade() -> None:
    _recreate([])
