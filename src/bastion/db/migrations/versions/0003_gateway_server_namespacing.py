"""gateway servers may offer names without a prefix

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 22:24:45.931063
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("namespaced", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("gateway_servers", schema=None) as batch_op:
        batch_op.drop_column("namespaced")
