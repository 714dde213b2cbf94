"""token expiring: a token's host is told once ahead of its expiry, and handed a successor

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 21:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bastion.db.schema import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs: a batch copy of access_tokens would be a needless rewrite of every token row.
    op.add_column("access_tokens", sa.Column("expiry_noticed_at", UTCDateTime(), nullable=True))
    op.add_column("access_tokens", sa.Column("successor_id", sa.String(length=36), nullable=True))
    op.create_index("ix_access_tokens_expires_at", "access_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_access_tokens_expires_at", table_name="access_tokens")
    for column in ("successor_id", "expiry_noticed_at"):
        if op.get_bind().dialect.name == "sqlite":
            op.execute(f"ALTER TABLE access_tokens DROP COLUMN {column}")  # not a batch copy
        else:
            op.drop_column("access_tokens", column)
