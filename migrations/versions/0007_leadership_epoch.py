"""The leadership epoch: a fencing token for the broker that commits.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

A broker that takes a PostgreSQL database's leadership lock (broker/leadership.py) adds one to
``epoch`` before it loads the state, and every transaction its writer commits first reads the
epoch ``FOR SHARE`` and fails unless it is still the broker's own. An old leader that lost its
lock without noticing yet (a frozen process, a cut connection) can then commit nothing the new
leader has not loaded: its commits that started before the increment finish before it (the
row lock), the later ones fail.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    leadership = op.create_table(
        "leadership",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leadership")),
    )
    op.bulk_insert(leadership, [{"id": 1, "epoch": 0}])


def downgrade() -> None:
    op.drop_table("leadership")
