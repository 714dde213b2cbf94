"""Alembic, driven from code: upgrade, downgrade, current and head for one database URL."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import InterfaceError, OperationalError

from bastion.db.engine import install_sqlite_pragmas, sync_url
from bastion.errors import Unavailable

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["sync_url"] = sync_url(url)
    return config


def _sync_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(sync_url(url))
    if engine.dialect.name == "sqlite":
        install_sqlite_pragmas(engine)
    return engine


@contextmanager
def _reachable() -> Generator[None, None, None]:
    """A database that cannot be reached (or refuses the work) is a clear error, not a driver traceback."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise Unavailable(f"cannot use the database: {str(exc.orig or exc).strip()}") from exc


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate up to ``revision``. On PostgreSQL concurrent callers serialise on an advisory lock (see env.py)."""
    with _reachable():
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    with _reachable():
        command.downgrade(alembic_config(url), revision)


@cache
def head() -> str:
    """The newest revision this code knows; read once, as /readyz asks on every probe."""
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    return heads[0]


def current(url: str) -> str | None:
    engine = _sync_engine(url)
    try:
        with _reachable(), engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def current_on(conn: sa.Connection) -> str | None:
    """The revision a connection's database is at; cheap and silent enough for every /readyz."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
