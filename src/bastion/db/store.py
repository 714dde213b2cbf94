"""The database handle services use: one transaction per use case."""

from __future__ import annotations

import contextlib
import fcntl
import os
import zlib
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection

from bastion.db import changes
from bastion.db.audit import ChainKeys, Journal, driver_error, seal_into_chain, take_recorded
from bastion.db.engine import SQLITE_BUSY_TIMEOUT_MS, create_engine, create_sync_engine
from bastion.errors import Unavailable
from bastion.events.bus import CHANGES_CHANNEL, Changed, EventBus, Subject
from bastion.events.replicas import Confirmation

if TYPE_CHECKING:
    from bastion.net.outbound import OutboundPolicy
    from bastion.vault.sealer import Vault

T = TypeVar("T")
SQLITE_BUSY = 5  # SQLite's result code when another connection holds the lock asked for


class _Busy(Exception):
    """SQLite's write lock is held elsewhere, and this attempt was not to wait for it."""


_PENDING_EVENTS = "bastion_pending_events"
_VAULT = "bastion_vault"
_OUTBOUND = "bastion_outbound"
_LIFETIME = "bastion_token_lifetime"
_IN_TRANSACTION: ContextVar[bool] = ContextVar("bastion_in_transaction", default=False)
# Threads ``write`` may use at once: its own, so the audit writes before every MCP call never queue behind other
# work on anyio's shared pool (password hashing, DNS look-ups). Within the sync engine's pool (5 + 10 overflow).
WRITE_THREADS = 10


def emit(conn: AsyncConnection, event: Changed) -> None:
    """Queue a change event on this transaction; it is published only if the transaction commits."""
    pending: list[Changed] = conn.info.setdefault(_PENDING_EVENTS, [])
    pending.append(event)


def outbound_of(conn: AsyncConnection) -> OutboundPolicy | None:
    """The install's outbound policy, for URLs a change registers (None: a store made without settings)."""
    policy: Callable[[], OutboundPolicy] | None = conn.info.get(_OUTBOUND)
    return policy() if policy is not None else None


def token_lifetime_of(conn: AsyncConnection) -> timedelta | None:
    """The longest lifetime of the tokens and keys this store's transactions mint (None: until revoked)."""
    lifetime: timedelta | None = conn.info.get(_LIFETIME)
    return lifetime


def sealer(conn: AsyncConnection) -> Vault:
    """The vault of the store whose transaction ``conn`` is: what a change must keep secret at rest is sealed."""
    vault: Vault | None = conn.info.get(_VAULT)
    if vault is None:
        raise RuntimeError("this store has no vault, so it cannot seal what this transaction keeps")
    return vault


@dataclass(slots=True)
class _Asked:
    """What a committing transaction asked of the other replicas (``events/replicas.Confirmation``), if anything."""

    confirmation: Confirmation | None = None


class Store:
    """Owns the engine. ``transaction()`` commits on success and rolls back on any error."""

    def __init__(
        self,
        engine: AsyncEngine,
        bus: EventBus | None = None,
        audit: ChainKeys | None = None,
        vault: Vault | None = None,
    ) -> None:
        self.engine = engine
        self.bus = bus or EventBus()
        # Admin actions record audit events on their transaction (``db.audit.record``); they are sealed into the
        # chain by the same commit, so a change and its audit event exist together or not at all.
        self.audit = audit
        # Seals what a change writes for later (a webhook event's token): see ``sealer``.
        self.vault = vault
        self._sync: sa.Engine | None = None
        # ``journal``'s own connection, checked out for good: its transactions run back to back, one at a time.
        self._journal_conn: PoolProxiedConnection | None = None
        self._journal_lock = anyio.Lock(fast_acquire=True)
        # SQLite has one writer at a time: queue this process's transactions on an async lock rather than in
        # SQLite's busy handler, where waiting threads starve and time out under load.
        self._writer = anyio.Lock(fast_acquire=True) if engine.dialect.name == "sqlite" else None
        self._write_threads = anyio.CapacityLimiter(WRITE_THREADS)
        # PostgreSQL: this process's row in ``replicas`` when it serves (events/replicas.py), so its own changes do
        # not wait for its own word.
        self.replica_id: str | None = None
        # What outbound URLs the install allows: a URL a change registers gets the verdict a connection would.
        self.outbound: Callable[[], OutboundPolicy] | None = None
        # How long a token or host key minted here may live at most (BASTION_TOKEN_MAX_LIFETIME_DAYS).
        self.token_lifetime: timedelta | None = None
        database = engine.url.database
        self._changes = (
            changes.ChangeWatcher(database)
            if engine.dialect.name == "sqlite" and database and database != ":memory:"
            else None
        )

    @classmethod
    def from_url(cls, url: str, audit: ChainKeys | None = None, vault: Vault | None = None) -> Store:
        return cls(create_engine(url), audit=audit, vault=vault)

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
        asked = _Asked()
        try:
            async with self._committing(asked) as conn:
                yield conn
            if asked.confirmation is not None:
                # The change holds on every replica before whoever made it hears that it is done.
                await asked.confirmation.wait()
        finally:
            if asked.confirmation is not None:
                await asked.confirmation.close()

    @asynccontextmanager
    async def _committing(self, asked: _Asked) -> AsyncGenerator[AsyncConnection, None]:
        """The transaction itself: committed, its events recorded and published; on PostgreSQL with other replicas
        live, their word is asked for (``asked``) before the commit."""
        pending: list[Changed] = []
        seqs: list[int] = []
        conn = await self._begin()
        # Kept, not read again: an invalidated connection's ``info`` would reconnect (outside SQLAlchemy's greenlet).
        info = conn.info
        # SQLite: the transaction's statements run shielded. A cancellation landing inside one has SQLAlchemy
        # force-close the aiosqlite connection, which can strand its sqlite3 connection, transaction open: the
        # database's write lock then stays taken until garbage collection. A cancellation waits for the
        # statements (local, short) instead, and lands before the commit.
        deferred = self.dialect == "sqlite"
        try:
            info[_PENDING_EVENTS] = pending
            info[_VAULT] = self.vault
            info[_OUTBOUND] = self.outbound
            info[_LIFETIME] = self.token_lifetime
            await anyio.lowlevel.checkpoint_if_cancelled()  # a cancellation that came during BEGIN lands here
            with anyio.CancelScope(shield=deferred):
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
                    if any(event.subject is not Subject.WEBHOOK for event in pending):
                        asked.confirmation = await Confirmation.ask(conn, self._conninfo(), self.replica_id)
                elif pending and self._changes is not None:
                    # Read by the other processes on this file (a running serve, when this is the CLI).
                    seqs = await changes.record(conn, pending)
            if deferred:
                await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled meanwhile: rolled back, not committed
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
            info.pop(_PENDING_EVENTS, None)
            info.pop(_VAULT, None)
            info.pop(_OUTBOUND, None)
            info.pop(_LIFETIME, None)
            if not conn.invalidated:  # an invalidated connection's info is cleared before the pool reuses it
                take_recorded(conn)  # a rolled-back transaction's audit events go with it (the connection is pooled)
            with anyio.CancelScope(shield=True):
                await conn.close()
        if seqs and self._changes is not None:
            self._changes.committed(seqs)
        for event in pending:
            self.bus.publish(event)

    def _conninfo(self) -> str:
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def freshen(self) -> None:
        """Publish what other processes committed on an embedded database since the last look (cheap when nothing
        was: one PRAGMA). The data plane calls it before each request, so a CLI's change holds for the next call."""
        if self._changes is not None:
            for event in self._changes.poll():
                self.bus.publish(event)

    async def _begin(self) -> AsyncConnection:
        """A pooled connection with its transaction begun.

        BEGIN is shielded: a cancellation landing inside it (SQLite's BEGIN IMMEDIATE may wait for the write
        lock) would have SQLAlchemy invalidate the connection half-begun and reconnect it outside its greenlet
        (MissingGreenlet), leaving the pool's close to hang. So is connecting to SQLite (a local file, and its
        statements are shielded for the reason ``_transaction`` gives).
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        conn = self.engine.connect()  # not connected until started
        try:
            with anyio.CancelScope(shield=self.dialect == "sqlite"):
                await conn.start()
            with anyio.CancelScope(shield=True):
                await conn.begin()
        except BaseException as exc:
            if conn.sync_connection is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()
            if isinstance(exc, OperationalError):
                raise Unavailable("the database is unreachable; try again shortly") from exc
            raise
        return conn

    async def write(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run ``fn`` in one write transaction on a synchronous connection in a worker thread, committed on return.

        For a hot path with several statements: the whole transaction is one thread hop instead of one per
        statement (each costs a thread wake-up with aiosqlite, a loop round trip with async psycopg).
        Never call it inside ``transaction()``.
        """
        try:
            if self._writer is None:
                return await anyio.to_thread.run_sync(self._write_sync, fn, limiter=self._write_threads)
            async with self._writer:
                # Not abandoned on cancellation: the thread finishes (commits or rolls back) either way.
                return await anyio.to_thread.run_sync(self._write_sync, fn, limiter=self._write_threads)
        except OperationalError as exc:
            raise Unavailable("the database is unreachable; try again shortly") from exc

    def _write_sync(self, fn: Callable[[sa.Connection], T]) -> T:
        with self._sync_engine().begin() as conn:
            return fn(conn)

    def _sync_engine(self) -> sa.Engine:
        if self._sync is None:
            self._sync = create_sync_engine(self.engine.url.render_as_string(hide_password=False))
        return self._sync

    async def journal(self, fn: Callable[[Journal], T], *, inline: bool = True) -> T:
        """Run ``fn`` in one write transaction on the driver's own cursor, committed on return.

        The audit log's path: a write precedes every forwarded call, so it skips what ``write`` spends per
        statement in SQLAlchemy (see ``db.audit.Journal``) and per transaction checking a connection out of the
        pool and back. One connection, kept, takes these transactions one after the other. ``inline=False``
        keeps a long transaction (a backlog's batch) off the event loop on SQLite too.
        """
        try:
            async with self._journal_lock:
                if self._writer is None:
                    return await anyio.to_thread.run_sync(self._journal_sync, fn, True, limiter=self._write_threads)
                async with self._writer:
                    # SQLite, a local file: on the event loop when the database's write lock is free at once (the
                    # transaction takes less than the hop to a thread and back), in a thread when another process
                    # holds it (the loop never waits on a lock).
                    if inline:
                        with contextlib.suppress(_Busy):
                            return self._journal_sync(fn, False)
                    return await anyio.to_thread.run_sync(self._journal_sync, fn, True, limiter=self._write_threads)
        except OperationalError as exc:
            raise Unavailable("the database is unreachable; try again shortly") from exc

    def _journal_sync(self, fn: Callable[[Journal], T], wait: bool) -> T:
        engine = self._sync_engine()
        dialect = engine.dialect
        while True:
            reused = self._journal_conn is not None
            if self._journal_conn is None:
                try:
                    self._journal_conn = engine.raw_connection()
                except dialect.loaded_dbapi.Error as exc:
                    raise driver_error(dialect, exc) from exc
            conn = self._journal_conn
            committing = False
            try:
                cursor = conn.cursor()
                try:
                    if dialect.name == "sqlite":
                        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS if wait else 0}")
                        try:
                            cursor.execute("BEGIN IMMEDIATE")  # the connection is in autocommit (``db.engine``)
                        except dialect.loaded_dbapi.OperationalError as exc:
                            # The primary code: extended ones (SQLITE_BUSY_RECOVERY …) are busy too.
                            if not wait and getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_BUSY:
                                raise _Busy from exc
                            raise
                    result = fn(Journal(cursor, dialect))
                    committing = True
                    conn.commit()
                finally:
                    cursor.close()
                return result
            except (DBAPIError, dialect.loaded_dbapi.Error) as exc:
                original: Any = exc.orig if isinstance(exc, DBAPIError) else exc
                lost = dialect.is_disconnect(original, conn.dbapi_connection, None)
                try:
                    conn.rollback()
                except dialect.loaded_dbapi.Error:
                    lost = True
                if lost:
                    self._journal_conn = None
                    conn.invalidate(original)
                # A connection that went away while idle (the database restarted) is replaced, and the
                # transaction, which never reached its commit, runs again on the new one: once.
                if lost and reused and not committing:
                    continue
                if isinstance(exc, DBAPIError):
                    raise
                raise driver_error(dialect, exc) from exc
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # noqa: BLE001  a connection that cannot roll back is not used again
                    self._journal_conn = None
                    conn.invalidate()
                raise

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncGenerator[None, None]:
        """Across every process on this database, one holder of ``name`` at a time.

        PostgreSQL: a transaction-level advisory lock, on a connection whose transaction stays open for the
        block. Its rollback gives the lock back, shielded: a block cancelled midway (an MCP call whose client
        hung up) never returns a connection to the pool still holding the lock, and should the rollback fail,
        the connection is dropped, which releases the lock as well. SQLite needs none: it is one process, and
        its write transactions already queue (BEGIN IMMEDIATE). SQLite: an exclusive lock (flock) on a file beside
        the database, so an `init` and a first `serve` on one new directory migrate one after the other.
        """
        if self.dialect != "postgresql":
            async with self._file_lock(name):
                yield
            return
        key = zlib.crc32(name.encode("utf-8"))
        conn = await self._begin()
        try:
            try:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            except OperationalError as exc:
                raise Unavailable("the database is unreachable; try again shortly") from exc
            yield
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await conn.rollback()
                except BaseException:
                    await conn.invalidate()
                    raise
                finally:
                    await conn.close()

    @asynccontextmanager
    async def _file_lock(self, name: str) -> AsyncGenerator[None, None]:
        database = self.engine.url.database
        if not database or database == ":memory:":
            yield  # a database of this process alone
            return
        path = f"{database}.{zlib.crc32(name.encode('utf-8')):08x}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=False)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OperationalError, OSError):
            return False
        return True

    async def migrations_current(self) -> bool:
        from bastion.db import migrate  # alembic is imported by the readiness check only

        try:
            async with self.engine.connect() as conn:
                revision = await conn.run_sync(migrate.current_on)
        except (OperationalError, OSError):
            return False
        return revision == migrate.head()

    async def close(self) -> None:
        if self._changes is not None:
            self._changes.close()
        if self._journal_conn is not None:
            self._journal_conn.close()
            self._journal_conn = None
        if self._sync is not None:
            self._sync.dispose()
        await self.engine.dispose()
