"""Tenants get a fair-share weight.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

``weight`` (>= 1 by the admin API; existing tenants get 1) divides contended capacity between
tenants (see ``agentcg.broker.fairshare``).
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


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("weight")
