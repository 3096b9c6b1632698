"""Session sizing can forget what it learned of an (organization, session class).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

``Sizing.ForgetSessionProfile`` records when a session class of an organization was forgotten;
at start-up the broker learns only from the sessions of that organization's tenants that ended
after it (as 0009 does for command classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "session_sizing_resets",
        sa.Column("organization", sa.String(), nullable=False),
        sa.Column("session_class", sa.String(), nullable=False),
        sa.Column("forgotten_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "organization", "session_class", name=op.f("pk_session_sizing_resets")
        ),
    )


def downgrade() -> None:
    op.drop_table("session_sizing_resets")
