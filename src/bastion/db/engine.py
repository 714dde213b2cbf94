"""Async engines for SQLite (WAL, busy timeout, foreign keys) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bastion.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS: Final = 5_000
# Engines are made with hide_parameters: a database error's message must not carry the values it was given
# (digests, sealed secrets, audit previews) into logs and error reports.
# Without it a silent (firewalled) PostgreSQL host stalls /readyz and startup for the kernel's TCP timeout.
PG_CONNECT_TIMEOUT_S: Final = 5
SUPPORTED_DRIVERS: Final = ("sqlite+aiosqlite", "postgresql+psycopg")


def normalise_url(url: str) -> str:
    """Accept the plain forms people type (`sqlite:///x`, `postgresql://…`) and pick our async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    else:
        raise ConfigError(f"BASTION_DATABASE_URL must be SQLite or PostgreSQL, not {backend!r}")
    return parsed.render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """The same database through a synchronous driver, for Alembic."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() == "sqlite":
        parsed = parsed.set(drivername="sqlite")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def install_sqlite_pragmas(engine: sa.Engine) -> None:
    event.listen(engine, "connect", _sqlite_pragmas)


def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def _begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout instead of failing
    # with "database is locked" when a read transaction later tries to write.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def install_sqlite_transactions(engine: sa.Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, open transactions.

    The sqlite3 module defers BEGIN until the first INSERT/UPDATE/DELETE, so a transaction whose first
    statement is a SAVEPOINT is opened by the savepoint itself and committed by its RELEASE: a later
    error could then no longer roll the earlier writes back. (The SQLAlchemy pysqlite documentation recipe.)
    """
    event.listen(engine, "connect", _autocommit_driver)
    event.listen(engine, "begin", _begin)


def _options(url: str, pool_size: int) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"hide_parameters": True}
    return {
        "hide_parameters": True,
        "pool_size": pool_size,
        "max_overflow": pool_size,
        "pool_pre_ping": True,
        "connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S},
    }


def _prepare(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        install_sqlite_pragmas(engine)
        install_sqlite_transactions(engine)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    url = normalise_url(url)
    engine = create_async_engine(url, **_options(url, pool_size))
    _prepare(engine.sync_engine)
    return engine


def create_sync_engine(url: str, *, pool_size: int = 4) -> sa.Engine:
    """The same database through the synchronous driver, set up as ``create_engine`` sets up its own."""
    url = normalise_url(url)
    engine = sa.create_engine(sync_url(url), **_options(url, pool_size))
    _prepare(engine)
    return engine
