"""Leases carry their session's class, and the lease that ended a session its peak.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

``session_class`` ("": none) is the kind of session a lease belongs to; ``session_peak_bytes``
(0 on every other lease) is, on the lease whose end ended its session, the most that session
held at once. A broker learns the maxima of a class from them at start-up, as it learns command
classes' peaks from ``peak_memory_bytes`` (``agentcg.broker.sizing.size_session_max``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(
            sa.Column("session_class", sa.String(), nullable=False, server_default=sa.text("''"))
        )
        batch.add_column(
            sa.Column(
                "session_peak_bytes", sa.BigInteger(), nullable=False, server_default=sa.text("0")
            )
        )
        batch.create_check_constraint("session_peak_bytes_nonnegative", "session_peak_bytes >= 0")


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_constraint("session_peak_bytes_nonnegative", type_="check")
        batch.drop_column("session_peak_bytes")
        batch.drop_column("session_class")
