"""Alembic environment: a synchronous engine for whichever database the config names."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from bastion.db.engine import install_sqlite_pragmas
from bastion.db.schema import metadata

config = context.config
engine = sa.create_engine(config.attributes["sync_url"], poolclass=sa.NullPool)
if engine.dialect.name == "sqlite":
    install_sqlite_pragmas(engine)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=engine.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
