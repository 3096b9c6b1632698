"""Drop the leases index on (tenant, command_class, ended_at_ms) that 0002 added.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

It served one query at start-up (the recent peaks sizing learns from) and cost an index update
on every lease write (each grant and release) after that; the start-up read does without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_leases_tenant_command_class_ended_at_ms", table_name="leases")


def downgrade() -> None:
    op.create_index(
        "ix_leases_tenant_command_class_ended_at_ms",
        "leases",
        ["tenant", "command_class", "ended_at_ms"],
    )
