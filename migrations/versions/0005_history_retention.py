"""Index leases by grant time (history retention); drop the unused idempotency-key index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

The broker deletes ended leases older than its retention (``--history-days``) in small batches,
oldest grant first: ``ix_leases_granted_at_ms`` makes each batch a bounded index range instead
of a table scan. ``ix_leases_tenant_idempotency_key`` served no query (a retried Reserve is
matched in memory, against the active leases) and cost an index write on every grant.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_leases_tenant_idempotency_key", table_name="leases")
    op.create_index("ix_leases_granted_at_ms", "leases", ["granted_at_ms"])


def downgrade() -> None:
    op.drop_index("ix_leases_granted_at_ms", table_name="leases")
    op.create_index("ix_leases_tenant_idempotency_key", "leases", ["tenant", "idempotency_key"])
