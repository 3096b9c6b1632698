"""Nodes can be cordoned (no new leases) and drained (leases revoked after a deadline).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

``cordoned_at_ms`` > 0 takes a node out of placement (``NodeAdmin.CordonNode``);
``drain_deadline_ms`` > 0 is when the broker revokes the leases still active on it. Both live in
the database so that a cordon survives a broker restart, a failover and the node registering
again. Existing nodes are in service (0, ``''``, 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("cordoned_at_ms", sa.BigInteger(), "0"),
    ("cordon_reason", sa.String(), "''"),
    ("drain_deadline_ms", sa.BigInteger(), "0"),
)


def upgrade() -> None:
    for name, type_, default in _COLUMNS:
        op.add_column(
            "nodes", sa.Column(name, type_, nullable=False, server_default=sa.text(default))
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
