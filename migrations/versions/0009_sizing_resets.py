"""Sizing can forget what it learned of a (tenant, command class).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

``Sizing.ForgetProfile`` records when a class was forgotten; at start-up the broker learns only
from the peaks of leases that ended after it, so a forgotten class stays forgotten across a
restart and a failover while the leases' history itself is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sizing_resets",
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("command_class", sa.String(), nullable=False),
        sa.Column("forgotten_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "command_class", name=op.f("pk_sizing_resets")),
    )


def downgrade() -> None:
    op.drop_table("sizing_resets")
