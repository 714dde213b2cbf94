"""The embedded database's change log: what one process commits, every other process on the file publishes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.db import changes, schema
from bastion.db.store import Store, emit
from bastion.events.bus import Changed, Subject

pytestmark = pytest.mark.anyio


@pytest.fixture
def two_processes(sqlite_template: Path, tmp_path: Path) -> tuple[Store, Store]:
    """Two stores on one SQLite file, as `serve` and a CLI would have (each its own watcher and bus)."""
    path = tmp_path / "bastion.db"
    path.write_bytes(sqlite_template.read_bytes())
    url = f"sqlite+aiosqlite:///{path}"
    return Store.from_url(url), Store.from_url(url)


async def _commit(store: Store, *events: Changed) -> None:
    async with store.transaction() as conn:
        for event in events:
            emit(conn, event)


def _heard(store: Store) -> list[Changed]:
    heard: list[Changed] = []
    store.bus.subscribe(heard.append)
    return heard


async def test_a_change_one_process_commits_is_published_by_the_other_and_not_twice_by_itself(
    two_processes: tuple[Store, Store],
) -> None:
    serve, cli = two_processes
    by_serve, by_cli = _heard(serve), _heard(cli)
    serve.freshen()  # the first look only learns where the log is
    cli.freshen()
    await _commit(cli, Changed(Subject.HOST, "h1"), Changed(Subject.TOKEN, "t1"))
    assert by_cli == [Changed(Subject.HOST, "h1"), Changed(Subject.TOKEN, "t1")]  # published on commit
    serve.freshen()
    assert by_serve == [Changed(Subject.HOST, "h1"), Changed(Subject.TOKEN, "t1")]
    cli.freshen()
    assert len(by_cli) == 2  # its own rows are not published again
    serve.freshen()
    assert len(by_serve) == 2  # nothing new: nothing published
    async with serve.transaction() as conn:  # a write without events (an audit entry, say) publishes nothing
        await conn.execute(sa.text("SELECT 1"))
    cli.freshen()
    assert len(by_cli) == 2
    await serve.close()
    await cli.close()


async def test_rows_pruned_before_they_were_read_make_every_cache_start_over(
    two_processes: tuple[Store, Store],
) -> None:
    serve, cli = two_processes
    by_serve = _heard(serve)
    serve.freshen()
    await _commit(cli, Changed(Subject.HOST, "h1"))
    await _commit(cli, Changed(Subject.HOST, "h2"))
    await _commit(cli, Changed(Subject.HOST, "h3"))
    async with cli.transaction() as conn:
        pruned = await changes.prune(conn, now=datetime.now(UTC) + changes.KEEP + timedelta(seconds=1))
    assert pruned == 2  # the newest row stays: it tells readers where the log is
    await _commit(cli, Changed(Subject.GATEWAY, "g1"))
    serve.freshen()
    assert by_serve == [Changed(Subject.ALL, ""), Changed(Subject.HOST, "h3"), Changed(Subject.GATEWAY, "g1")]
    await serve.close()
    await cli.close()


async def test_postgresql_leaves_the_log_empty(pg_store: Store) -> None:
    await _commit(pg_store, Changed(Subject.HOST, "h1"))
    pg_store.freshen()  # nothing to read: replicas hear each other through LISTEN/NOTIFY
    async with pg_store.transaction() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(schema.change_log))).scalar_one() == 0
