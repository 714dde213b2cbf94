"""The map's tables and engines: SQLite (WAL, writers queue on a busy timeout) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
PG_CONNECT_TIMEOUT_S: Final = 5

metadata = sa.MetaData()

# One row per connection (a person enrolled through one gateway). Each concern keeps the version of the event
# that last set it, so events applied in any order end in the state of the newest one.
connections = sa.Table(
    "bastion_agent_connections",
    metadata,
    sa.Column("connection_id", sa.String(64), primary_key=True),
    sa.Column("member_id", sa.String(64), nullable=False),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("email_key", sa.String(320), nullable=False, index=True),  # lower-cased, for lookups
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("gateway", sa.String(200), nullable=True),
    sa.Column("mcp_url", sa.String(2048), nullable=True),
    sa.Column("member_version", sa.BigInteger, nullable=False),  # the event that last set the fields above
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("enabled_version", sa.BigInteger, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),  # the newest event version applied to this connection
)

# Tokens by id. A revoked token keeps its row without the ciphertext (a tombstone), so a late token.minted for it
# cannot bring it back. The live token of a connection is its unrevoked one minted at the highest version.
tokens = sa.Table(
    "bastion_agent_tokens",
    metadata,
    sa.Column("token_id", sa.String(64), primary_key=True),
    sa.Column("connection_id", sa.String(64), nullable=False, index=True),
    sa.Column("sealed", sa.LargeBinary, nullable=True),
    sa.Column("minted_version", sa.BigInteger, nullable=True),
    sa.Column("revoked", sa.Boolean, nullable=False),
)

hosts = sa.Table(
    "bastion_agent_hosts",
    metadata,
    sa.Column("host", sa.String(200), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)

# Every webhook-id applied, so a retried delivery is answered without being applied twice.
deliveries = sa.Table(
    "bastion_agent_deliveries",
    metadata,
    sa.Column("webhook_id", sa.String(256), primary_key=True),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("received_at", sa.BigInteger, nullable=False, index=True),  # unix seconds
)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not open transactions itself: `begin` below does, with IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front: concurrent deliveries queue instead of failing to upgrade a read lock.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``: ``sqlite:///path`` or ``postgresql://…`` (the async drivers are picked here).

    Raises:
        ValueError: a database other than SQLite or PostgreSQL.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_async_engine(parsed.set(drivername="sqlite+aiosqlite"), hide_parameters=True)
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        return create_async_engine(
            parsed.set(drivername="postgresql+psycopg"),
            hide_parameters=True,
            pool_pre_ping=True,
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
        )
    raise ValueError(f"the token map lives in SQLite or PostgreSQL, not {backend!r}")


async def insert_ignoring_conflict(conn: AsyncConnection, table: sa.Table, values: dict[str, Any]) -> bool:
    """Insert a row unless one with the same primary key exists; whether it was inserted."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT … ON CONFLICT through SQLAlchemy's async layer.
    key = next(iter(table.primary_key.columns))
    statement = dialect.insert(table).values(values).on_conflict_do_nothing().returning(key)
    result = await conn.execute(statement)
    return result.first() is not None
