"""servers: the environment variable a stdio server reads each person's token from

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both engines: no copy of the servers table.
    op.add_column("servers", sa.Column("token_env", sa.String(length=64), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # Not a batch copy: recreating servers would cascade-delete the identities and tokens that point at it.
        op.execute("ALTER TABLE servers DROP COLUMN token_env")
    else:
        op.drop_column("servers", "token_env")
