"""Leases carry their session's declared maximum (deadlock avoidance between sessions).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

``session_max_memory_bytes`` (0: not declared) is what the session the lease belongs to said it
will hold at most, all its leases together; admission keeps every declared session on a node
able to reach it (see ``agentcg.broker.admission.is_safe``). Kept on every lease of the session
so that a restarted broker rebuilds the claims from the active leases alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(
            sa.Column(
                "session_max_memory_bytes",
                sa.BigInteger(),
                nullable=False,
                server_default=sa.text("0"),
            )
        )
        batch.create_check_constraint(
            "session_max_memory_bytes_nonnegative", "session_max_memory_bytes >= 0"
        )


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_constraint("session_max_memory_bytes_nonnegative", type_="check")
        batch.drop_column("session_max_memory_bytes")
