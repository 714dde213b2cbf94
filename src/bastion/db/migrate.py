"""Alembic, driven from code: upgrade, downgrade, current and head for one database URL.

Alembic itself (a fifth of a restart's imports and ~12 MB) is imported only when there is migrating to do: a
database already at ``HEAD`` (every restart) is recognised with one query.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import sqlalchemy as sa
from sqlalchemy.exc import InterfaceError, OperationalError

from bastion.db.engine import install_sqlite_pragmas, sync_url
from bastion.errors import Unavailable

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
# The newest revision in migrations/versions (a test holds it to alembic's own reading of that directory).
HEAD: Final = "0011"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

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
    if revision in ("head", HEAD) and current(url) == HEAD:
        return
    from alembic import command

    with _reachable():
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    with _reachable():
        command.downgrade(alembic_config(url), revision)


def head() -> str:
    """The newest revision this code knows."""
    return HEAD


def current(url: str) -> str | None:
    engine = _sync_engine(url)
    try:
        with _reachable(), engine.connect() as conn:
            return current_on(conn)
    finally:
        engine.dispose()


def current_on(conn: sa.Connection) -> str | None:
    """The revision a connection's database is at; cheap and silent enough for every /readyz."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
