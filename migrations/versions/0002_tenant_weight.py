"""Tenants get a fair-share weight; leases get an index to learn usage per command class.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

``weight`` (>= 1 by the admin API; existing tenants get 1) divides contended capacity between
tenants (see ``agentcg.broker.fairshare``). The index serves the start-up load of the observed
peaks per (tenant, command class) that overcommit learns from.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tenants",
        sa.Column("weight", sa.BigInteger(), nullable=False, server_default=sa.text("1")),
    )
    op.create_index(
        "ix_leases_tenant_command_class_ended_at_ms",
        "leases",
        ["tenant", "command_class", "ended_at_ms"],
    )


def downgrade() -> None:
    op.drop_index("ix_leases_tenant_command_class_ended_at_ms", table_name="leases")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("weight")
