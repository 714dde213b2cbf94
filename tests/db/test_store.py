"""The Store: connection settings, UTC times, all-or-nothing transactions, and a clear 503 when the database is gone."""

from __future__ import annotations

import sqlite3
import threading
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, StatementError

from bastion.db import audit as audit_rows
from bastion.db import migrate, schema
from bastion.db.engine import SQLITE_BUSY_TIMEOUT_MS
from bastion.db.store import Store, emit
from bastion.domain.audit import AuditEvent
from bastion.domain.ids import new_id
from bastion.errors import Unavailable
from bastion.events.bus import Changed, Subject
from bastion.services.audit import AuditKeys
from tests.processes import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
async def bare_store(db_url: str) -> AsyncIterator[Store]:
    """A store on a migrated, empty database (no workspace yet), on each engine in turn."""
    store = Store.from_url(db_url)
    try:
        yield store
    finally:
        await store.close()


async def _workspace_count(store: Store) -> int:
    async with store.transaction() as conn:
        return (await conn.execute(sa.select(sa.func.count()).select_from(schema.workspaces))).scalar_one()


async def test_sqlite_connections_use_wal_a_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    migrate.upgrade(f"sqlite:///{path}")
    store = Store.from_url(f"sqlite:///{path}")
    try:
        async with store.transaction() as conn:
            assert (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(sa.text("PRAGMA busy_timeout"))).scalar() == SQLITE_BUSY_TIMEOUT_MS
            assert (await conn.execute(sa.text("PRAGMA foreign_keys"))).scalar() == 1
        with pytest.raises(IntegrityError):
            async with store.transaction() as conn:
                await conn.execute(
                    schema.roles.insert().values(
                        id="r1",
                        workspace_id="no-such-workspace",
                        name="r",
                        description="",
                        capabilities=[],
                        builtin=False,
                        version=1,
                        created_at=datetime.now(UTC),
                        updated_at=datetime.now(UTC),
                    )
                )
    finally:
        await store.close()


async def test_aware_datetimes_come_back_as_the_same_instant_in_utc(bare_store: Store) -> None:
    written = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    async with bare_store.transaction() as conn:
        await conn.execute(schema.workspaces.insert().values(id="w1", name="W", created_at=written))
    async with bare_store.transaction() as conn:
        read = (await conn.execute(sa.select(schema.workspaces.c.created_at))).scalar_one()
    assert read == written
    assert read.tzinfo is UTC
    assert read.isoformat() == "2026-03-28T20:00:15.123456+00:00"


async def test_a_naive_datetime_is_refused_and_nothing_is_written(bare_store: Store) -> None:
    with pytest.raises(StatementError) as caught:
        async with bare_store.transaction() as conn:
            await conn.execute(schema.workspaces.insert().values(id="w1", name="W", created_at=datetime(2026, 1, 1)))  # noqa: DTZ001
    assert isinstance(caught.value.orig, ValueError)
    assert "naive datetime" in str(caught.value.orig)
    assert await _workspace_count(bare_store) == 0


async def test_a_failing_transaction_leaves_nothing_half_written(bare_store: Store) -> None:
    now = datetime.now(UTC)
    with pytest.raises(RuntimeError, match="boom"):
        async with bare_store.transaction() as conn:
            await conn.execute(schema.workspaces.insert().values(id="w1", name="W", created_at=now))
            raise RuntimeError("boom")
    with pytest.raises(IntegrityError):
        async with bare_store.transaction() as conn:
            await conn.execute(schema.workspaces.insert().values(id="w2", name="W", created_at=now))
            await conn.execute(schema.workspaces.insert().values(id="w2", name="again", created_at=now))
    assert await _workspace_count(bare_store) == 0


async def test_change_events_are_published_only_when_the_transaction_commits(bare_store: Store) -> None:
    seen: list[Changed] = []
    bare_store.bus.subscribe(seen.append)
    with pytest.raises(RuntimeError):
        async with bare_store.transaction() as conn:
            emit(conn, Changed(Subject.HOST, "h1"))
            raise RuntimeError("rolled back")
    assert seen == []
    async with bare_store.transaction() as conn:
        emit(conn, Changed(Subject.HOST, "h2"))
    assert seen == [Changed(Subject.HOST, "h2")]


def _unreachable_url(kind: str, tmp_path: Path) -> str:
    if kind == "postgresql":
        return f"postgresql://postgres@127.0.0.1:{free_port()}/bastion"  # nothing listens there
    return f"sqlite:///{tmp_path / 'missing' / 'dir' / 'bastion.db'}"


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
async def test_an_unreachable_database_is_not_ready_and_transactions_raise_unavailable(
    kind: str, tmp_path: Path
) -> None:
    store = Store.from_url(_unreachable_url(kind, tmp_path))
    try:
        assert await store.ping() is False
        assert await store.migrations_current() is False
        with pytest.raises(Unavailable) as caught:
            async with store.transaction():
                pass
        assert caught.value.status == 503
        assert caught.value.code == "unavailable"
        with pytest.raises(Unavailable):
            await store.journal(lambda journal: journal.cursor.execute("SELECT 1"))
    finally:
        await store.close()
        await _join_aiosqlite_workers()


async def _join_aiosqlite_workers() -> None:
    # After a failed connect aiosqlite queues its worker's stop without awaiting it; let the workers finish
    # while this event loop still runs, or they report into a closed loop during a later test.
    for thread in threading.enumerate():
        if "_connection_worker_thread" in thread.name:
            await anyio.to_thread.run_sync(thread.join, 5)


async def test_migrations_current_is_false_before_the_first_upgrade_and_true_after(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bastion.db'}"
    store = Store.from_url(url)
    try:
        assert await store.ping() is True
        assert await store.migrations_current() is False
        migrate.upgrade(url)
        assert await store.migrations_current() is True
    finally:
        await store.close()


async def test_a_database_error_does_not_list_the_parameters_it_was_given(store: Store) -> None:
    # (PostgreSQL's own DETAIL may still quote a conflicting key: callers map such errors and never show them.)
    canary = "canary-secret-value-5d1e"
    row = {"key_id": canary, "seals": 0, "first_used_at": datetime.now(UTC), "retired_at": None}
    async with store.transaction() as conn:
        await conn.execute(sa.insert(schema.vault_keys).values(row))
    with pytest.raises(IntegrityError) as caught:
        async with store.transaction() as conn:
            await conn.execute(sa.insert(schema.vault_keys).values(row))
    assert "[parameters:" not in str(caught.value)
    assert "hidden due to hide_parameters" in str(caught.value)


async def test_write_has_threads_of_its_own(bare_store: Store) -> None:
    """Audit writes (the hot path before every MCP call) never queue behind work on anyio's shared thread pool."""
    shared = anyio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(shared.total_tokens))]
    for holder in holders:
        shared.acquire_on_behalf_of_nowait(holder)
    now = datetime.now(UTC)
    try:
        with anyio.fail_after(60):  # a guard against hanging (the bug), not a measure of speed
            await bare_store.write(
                lambda conn: conn.execute(schema.workspaces.insert().values(id="w", name="w", created_at=now))
            )
    finally:
        for holder in holders:
            shared.release_on_behalf_of(holder)
    assert await _workspace_count(bare_store) == 1


def _pending(name: str) -> AuditEvent:
    return AuditEvent(
        id=new_id(), occurred_at=datetime.now(UTC), kind="mcp", method="tools/call", outcome="pending", name=name
    )


async def _names(store: Store) -> list[str]:
    async with store.transaction() as conn:
        query = sa.select(schema.audit_events.c.name).order_by(schema.audit_events.c.occurred_at)
        return list((await conn.execute(query)).scalars())


async def test_a_journal_error_comes_out_as_sqlalchemys_without_its_values_and_the_journal_goes_on(
    store: Store,
) -> None:
    assert store.audit is not None
    keys = store.audit
    canary = _pending("canary-secret-value-7f3a")
    await store.journal(lambda journal: audit_rows.write_pending(journal, keys, [canary]))
    with pytest.raises(IntegrityError) as caught:  # the same event id twice
        await store.journal(lambda journal: audit_rows.write_pending(journal, keys, [_pending("lost"), canary]))
    assert "canary-secret-value-7f3a" not in str(caught.value)
    assert "[parameters" not in str(caught.value)
    await store.journal(lambda journal: audit_rows.write_pending(journal, keys, [_pending("after")]))
    assert await _names(store) == ["canary-secret-value-7f3a", "after"]  # the failed transaction left nothing


async def test_the_journal_replaces_a_connection_the_database_dropped_while_it_was_idle(pg_store: Store) -> None:
    assert pg_store.audit is not None
    keys = pg_store.audit

    def first(journal: audit_rows.Journal) -> int:
        audit_rows.write_pending(journal, keys, [_pending("before")])
        journal.cursor.execute("SELECT pg_backend_pid()")
        return int(journal.cursor.fetchone()[0])

    pid = await pg_store.journal(first)
    async with pg_store.transaction() as conn:  # as a database restart or an idle-connection reaper would
        assert (await conn.execute(sa.select(sa.func.pg_terminate_backend(pid)))).scalar() is True
    await pg_store.journal(lambda journal: audit_rows.write_pending(journal, keys, [_pending("after")]))
    assert await _names(pg_store) == ["before", "after"]


async def test_a_journal_write_waiting_for_another_processs_sqlite_lock_waits_off_the_event_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bastion.db"
    migrate.upgrade(f"sqlite:///{path}")
    store = Store.from_url(f"sqlite:///{path}", audit=AuditKeys.from_secret(b"k" * 32).chain_keys())
    assert store.audit is not None
    keys = store.audit
    holder = sqlite3.connect(path, isolation_level=None)  # as a CLI command in another process would
    done = anyio.Event()

    async def write() -> None:
        await store.journal(lambda journal: audit_rows.write_pending(journal, keys, [_pending("waited")]))
        done.set()

    try:
        await store.journal(lambda journal: audit_rows.write_pending(journal, keys, [_pending("first")]))
        holder.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            # Were the write waiting on the loop, this sleep would only end once it had given up (busy_timeout).
            await anyio.sleep(0.2)
            assert not done.is_set()
            holder.execute("COMMIT")
        assert done.is_set()
        assert await _names(store) == ["first", "waited"]
    finally:
        holder.close()
        await store.close()


@pytest.mark.parametrize("moment", ["begin", "before_cursor_execute"])
async def test_a_transaction_cancelled_as_it_begins_or_mid_statement_leaves_the_store_usable_and_closable(
    db_url: str, moment: str
) -> None:
    """A client hanging up as its transaction starts (SQLite's BEGIN IMMEDIATE, PostgreSQL's first statement),
    or during a statement: nothing is written, no error but the cancellation, and the database and the store
    work and close afterwards (no MissingGreenlet, no write lock left taken, no hanging close)."""
    store = Store.from_url(db_url)
    reached = anyio.Event()

    def arrived(*_args: object) -> None:
        reached.set()

    event.listen(store.engine.sync_engine, moment, arrived, insert=True)
    try:

        async def doomed() -> None:
            async with store.transaction() as conn:
                await conn.execute(schema.workspaces.insert().values(id="w1", name="W", created_at=datetime.now(UTC)))

        with anyio.fail_after(60):  # a guard against hanging (the bug), not a measure of speed
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(doomed)
                    await reached.wait()
                    scope.cancel()
            assert scope.cancelled_caught
            event.remove(store.engine.sync_engine, moment, arrived)
            assert await _workspace_count(store) == 0
            other = Store.from_url(db_url)  # another process's view: the database is not left locked
            try:
                async with other.transaction() as conn:
                    await conn.execute(
                        schema.workspaces.insert().values(id="w2", name="W", created_at=datetime.now(UTC))
                    )
            finally:
                await other.close()
            assert await _workspace_count(store) == 1
    finally:
        with anyio.fail_after(60):
            await store.close()


async def test_a_cancelled_exclusive_block_gives_its_lock_back_on_a_connection_kept_for_others(
    pg_store: Store, pg_migrated_url: str
) -> None:
    """An MCP call cancelled mid-refresh must not leave the refresh lock taken (every later refresh of that
    identity would wait for ever), nor throw its pooled connection away to get rid of it."""
    name = "bastion.test.cancelled-exclusive"
    dropped: list[object] = []

    def invalidated(*args: object) -> None:
        dropped.append(args)

    event.listen(pg_store.engine.sync_engine.pool, "invalidate", invalidated)
    with anyio.CancelScope() as scope:
        async with pg_store.exclusive(name):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert dropped == []
    other = Store.from_url(pg_migrated_url)
    try:
        async with other.engine.connect() as conn:
            key = zlib.crc32(name.encode("utf-8"))
            free = (await conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key})).scalar_one()
            assert free is True
            await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        with anyio.fail_after(60):  # a guard against hanging, not a measure of speed
            async with pg_store.exclusive(name), other.exclusive("bastion.test.another"):
                pass
    finally:
        await other.close()
