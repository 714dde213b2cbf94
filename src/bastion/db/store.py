"""The database handle services use: one transaction per use case."""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion.db import migrate
from bastion.db.audit import ChainKeys, seal_into_chain, take_recorded
from bastion.db.engine import create_engine, create_sync_engine
from bastion.errors import Unavailable
from bastion.events.bus import CHANGES_CHANNEL, Changed, EventBus

T = TypeVar("T")
_PENDING_EVENTS = "bastion_pending_events"
_IN_TRANSACTION: ContextVar[bool] = ContextVar("bastion_in_transaction", default=False)


def emit(conn: AsyncConnection, event: Changed) -> None:
    """Queue a change event on this transaction; it is published only if the transaction commits."""
    pending: list[Changed] = conn.info.setdefault(_PENDING_EVENTS, [])
    pending.append(event)


class Store:
    """Owns the engine. ``transaction()`` commits on success and rolls back on any error."""

    def __init__(self, engine: AsyncEngine, bus: EventBus | None = None, audit: ChainKeys | None = None) -> None:
        self.engine = engine
        self.bus = bus or EventBus()
        # Admin actions record audit events on their transaction (``db.audit.record``); they are sealed into the
        # chain by the same commit, so a change and its audit event exist together or not at all.
        self.audit = audit
        self._sync: sa.Engine | None = None
        # SQLite has one writer at a time: queue this process's transactions on an async lock rather than in
        # SQLite's busy handler, where waiting threads starve and time out under load.
        self._writer = anyio.Lock() if engine.dialect.name == "sqlite" else None

    @classmethod
    def from_url(cls, url: str, audit: ChainKeys | None = None) -> Store:
        return cls(create_engine(url), audit=audit)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncGenerator[AsyncConnection, None]:
        if self._writer is None or _IN_TRANSACTION.get():
            async with self._transaction() as conn:
                yield conn
            return
        async with self._writer:
            token = _IN_TRANSACTION.set(True)
            try:
                async with self._transaction() as conn:
                    yield conn
            finally:
                _IN_TRANSACTION.reset(token)

    @asynccontextmanager
    async def _transaction(self) -> AsyncGenerator[AsyncConnection, None]:
        pending: list[Changed] = []
        try:
            conn = await self.engine.connect()
        except OperationalError as exc:
            raise Unavailable("the database is unreachable; try again shortly") from exc
        try:
            await conn.begin()
            conn.info[_PENDING_EVENTS] = pending
            yield conn
            recorded = take_recorded(conn)
            if recorded:
                if self.audit is None:
                    raise RuntimeError("this store has no audit key, so it cannot record what was done")
                await seal_into_chain(conn, self.audit, new=recorded)
            if pending and self.dialect == "postgresql":
                # Delivered to every replica's listener when (and only if) this transaction commits.
                for event in pending:
                    await conn.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, event.encode())))
            # Shielded: a caller cancelled now (a client hung up) must not leave the transaction, and on SQLite
            # the database's write lock, held by a connection nobody will finish.
            with anyio.CancelScope(shield=True):
                await conn.commit()
        except OperationalError as exc:
            with anyio.CancelScope(shield=True):
                await conn.rollback()
            raise Unavailable("the database is unreachable; try again shortly") from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.rollback()
            raise
        finally:
            conn.info.pop(_PENDING_EVENTS, None)
            take_recorded(conn)  # a rolled-back transaction's audit events go with it (the connection is pooled)
            with anyio.CancelScope(shield=True):
                await conn.close()
        for event in pending:
            self.bus.publish(event)

    async def write(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run ``fn`` in one write transaction on a synchronous connection in a worker thread, committed on return.

        For a hot path with several statements: the whole transaction is one thread hop instead of one per
        statement (each costs a thread wake-up with aiosqlite, a loop round trip with async psycopg).
        Never call it inside ``transaction()``.
        """
        try:
            if self._writer is None:
                return await anyio.to_thread.run_sync(self._write_sync, fn)
            async with self._writer:
                # Not abandoned on cancellation: the thread finishes (commits or rolls back) either way.
                return await anyio.to_thread.run_sync(self._write_sync, fn)
        except OperationalError as exc:
            raise Unavailable("the database is unreachable; try again shortly") from exc

    def _write_sync(self, fn: Callable[[sa.Connection], T]) -> T:
        if self._sync is None:
            self._sync = create_sync_engine(self.engine.url.render_as_string(hide_password=False))
        with self._sync.begin() as conn:
            return fn(conn)

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncGenerator[None, None]:
        """Across every process on this database, one holder of ``name`` at a time.

        PostgreSQL: a session advisory lock on a connection held for the block. SQLite needs none: it is
        one process, and its write transactions already queue (BEGIN IMMEDIATE).
        """
        if self.dialect != "postgresql":
            yield
            return
        key = zlib.crc32(name.encode("utf-8"))
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                await conn.commit()
                try:
                    yield
                finally:
                    await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    await conn.commit()
        except OperationalError as exc:
            raise Unavailable("the database is unreachable; try again shortly") from exc

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OperationalError, OSError):
            return False
        return True

    async def migrations_current(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                revision = await conn.run_sync(migrate.current_on)
        except (OperationalError, OSError):
            return False
        return revision == migrate.head()

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.dispose()
        await self.engine.dispose()
