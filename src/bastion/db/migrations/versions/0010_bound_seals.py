"""bound seals: an identity's seal binds its server and owner; rows sealed before are re-sealed online

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bastion.db.schema import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


_ADDED = (("identities", "sealed_bound"), ("draft_identities", "owner_id"), ("draft_identities", "sealed_bound"))


def upgrade() -> None:
    # Plain ADD COLUMNs on both engines: a batch copy of workspaces or identities would cascade-delete what points at
    # them. NULL seals_bound_at: the workspace may hold seals made before (services.rotation.rebind marks it).
    op.add_column("workspaces", sa.Column("seals_bound_at", UTCDateTime(), nullable=True))
    op.add_column("identities", sa.Column("sealed_bound", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("draft_identities", sa.Column("owner_id", sa.String(length=36), nullable=True))
    op.add_column(
        "draft_identities", sa.Column("sealed_bound", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    # Release 0009 opens seals without a binding, so bound ones would no longer open: refused while any exists.
    for table in ("identities", "draft_identities"):
        query = sa.text(f"SELECT count(*) FROM {table} WHERE sealed_bound")  # noqa: S608  two fixed names
        bound = op.get_bind().execute(query).scalar_one()
        if bound:
            raise RuntimeError(f"{bound} row(s) of {table} are sealed bound to server and owner; 0009 cannot open them")
    for table, column in (*_ADDED, ("workspaces", "seals_bound_at")):
        if op.get_bind().dialect.name == "sqlite":
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")  # not a batch copy (see upgrade)
        else:
            op.drop_column(table, column)
