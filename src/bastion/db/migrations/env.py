"""Alembic environment: a synchronous engine for whichever database the config names."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from bastion.db.engine import install_sqlite_pragmas
from bastion.db.schema import metadata

# Replicas starting together on one PostgreSQL database take turns: the first migrates, the rest
# find the schema at head. Any fixed 64-bit number works as long as every Bastion uses the same one.
MIGRATION_LOCK_KEY = 0x62617374696F6E  # "bastion"

config = context.config
engine = sa.create_engine(config.attributes["sync_url"], poolclass=sa.NullPool)
postgres = engine.dialect.name == "postgresql"
if engine.dialect.name == "sqlite":
    install_sqlite_pragmas(engine)

with engine.connect() as connection:
    if postgres:
        # A session lock, committed at once, so Alembic still sees (and manages) a fresh transaction.
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()
    try:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=engine.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if postgres:
            connection.rollback()
            connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
engine.dispose()
