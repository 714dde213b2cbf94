"""The audit write path: grouped commits, one event per request, replicas appending to one chain."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sqlalchemy as sa

from bastion import wiring
from bastion.db import schema
from bastion.db.store import Store
from bastion.services import audit_query
from bastion.services.audit import Audit, AuditKeys, AuditUnavailable, CallRecord, before_forwarding
from bastion.settings import Settings

pytestmark = pytest.mark.anyio


def _keys(settings: Settings) -> AuditKeys:
    return wiring.audit_keys_from(settings)


def _secret(settings: Settings) -> bytes:
    assert settings.audit_key is not None
    return settings.audit_key.get_secret_value().encode("utf-8")


async def _outcomes(store: Store) -> list[tuple[Any, ...]]:
    async with store.transaction() as conn:
        query = sa.select(schema.audit_events.c.seq, schema.audit_events.c.outcome, schema.audit_events.c.name)
        return [tuple(r) for r in (await conn.execute(query.order_by(schema.audit_events.c.seq))).all()]


async def _request(log: Audit, name: str, forward: bool = True) -> None:
    async with log.call(CallRecord(method="tools/call", gateway="g", principal=None, name=name)):
        if forward:
            await before_forwarding()


async def test_concurrent_requests_share_commits_and_each_gets_exactly_one_sealed_event(
    store: Store, settings: Settings
) -> None:
    log = Audit(store, _keys(settings))
    async with log.running(), anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(_request, log, f"call-{i}", i % 4 != 0)
    events = await _outcomes(store)
    assert sorted(name for _seq, _outcome, name in events) == sorted(f"call-{i}" for i in range(200))
    assert [seq for seq, _o, _n in events] == list(range(1, 201))
    assert {outcome for _s, outcome, _n in events} == {"ok"}
    assert (await audit_query.verify(store, _secret(settings))).ok


async def test_a_request_whose_event_cannot_be_written_is_not_forwarded_and_is_sealed_once_the_log_is_back(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Audit(store, _keys(settings))
    forwarded: list[str] = []

    def broken(*_args: Any) -> None:
        raise OSError("injected")

    async with log.running():
        monkeypatch.setattr("bastion.db.audit.write_pending", broken)
        with pytest.raises(AuditUnavailable):
            async with log.call(CallRecord(method="tools/call", gateway="g", principal=None, name="refused")):
                await before_forwarding()
                forwarded.append("refused")
        monkeypatch.undo()
        await _request(log, "after")
    assert forwarded == []
    assert [(o, n) for _s, o, n in await _outcomes(store)] == [("error", "refused"), ("ok", "after")]


async def test_two_replicas_append_to_one_chain_without_a_gap_or_a_fork(pg_store: Store, pg_migrated_url: str) -> None:
    secret = secrets.token_bytes(32)
    keys = AuditKeys.from_secret(secret)
    replicas = [Store.from_url(pg_migrated_url, audit=keys.chain_keys()) for _ in range(2)]
    logs = [Audit(store, keys) for store in replicas]
    try:
        async with logs[0].running(), logs[1].running(), anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(_request, logs[i % 2], f"r{i % 2}-{i}")
        events = await _outcomes(replicas[0])
        assert [seq for seq, _o, _n in events] == list(range(1, 301))
        assert len({name for _s, _o, name in events}) == 300
        assert (await audit_query.verify(pg_store, secret)).ok
    finally:
        for store in replicas:
            await store.close()


async def test_values_no_database_stores_are_made_storable_before_hashing(store: Store, settings: Settings) -> None:
    # NUL in a path segment or a tool name, a lone surrogate: PostgreSQL would refuse the row and, kept for the
    # next commit, it would block every later event.
    log = Audit(store, _keys(settings))
    async with log.running():
        await log.refused(CallRecord(method="http", gateway="\x00", principal=None, outcome="refused"))
        await _request(log, "tool\x00name\ud800")
        await _request(log, "after")
    events = await _outcomes(store)
    assert [(o, n) for _s, o, n in events] == [("refused", None), ("ok", "tool\ufffdname?"), ("ok", "after")]
    assert (await audit_query.verify(store, _secret(settings))).ok


async def test_an_event_the_database_refuses_is_kept_in_a_reduced_form_and_blocks_nothing(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import DataError

    from bastion.db import audit as rows

    original = rows.append

    def picky(conn: Any, keys: Any, *, new: Any = (), finished: Any = ()) -> Any:
        if any(e.name == "unstorable" for e in (*new, *finished)):
            raise DataError("INSERT …", None, ValueError("refused by the database"))
        return original(conn, keys, new=new, finished=finished)

    monkeypatch.setattr("bastion.db.audit.append", picky)
    log = Audit(store, _keys(settings))
    async with log.running():
        await log.refused(CallRecord(method="http", gateway="g", principal=None, name="unstorable", outcome="refused"))
        await log.flush()
        await _request(log, "after")
    events = await _outcomes(store)
    assert [(o, n) for _s, o, n in events] == [("refused", None), ("ok", "after")]


async def test_recovery_seals_a_forged_pending_row_as_tampered_not_as_a_real_call(
    store: Store, settings: Settings
) -> None:
    from datetime import UTC, datetime, timedelta

    log = Audit(store, _keys(settings), stale_after_s=60)
    async with log.running(), log.call(CallRecord(method="tools/call", gateway="g", principal=None, name="real")):
        await before_forwarding()
    forged = {
        "id": "forged-0000-0000-0000-000000000000",
        "occurred_at": datetime.now(UTC) - timedelta(hours=1),
        "kind": "mcp",
        "method": "tools/call",
        "outcome": "pending",
        "actor": "someone@example.com",
        "name": "drop_everything",
    }
    async with store.transaction() as conn:
        await conn.execute(sa.insert(schema.audit_events).values(forged))
    assert await log.recover() == 1
    events = await _outcomes(store)
    assert [(o, n) for _s, o, n in events] == [("ok", "real"), ("tampered", "drop_everything")]
    assert (await audit_query.verify(store, _secret(settings))).ok


async def test_seals_are_written_while_requests_keep_coming_not_only_in_a_lull(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under steady load another request's commit always comes before the drain's turn at the lock: the drain
    # must take whatever seals are queued when its turn comes, or they wait for a lull that never comes.
    monkeypatch.setattr("bastion.services.audit.SEAL_DELAY_S", 0.0)
    sealed_under_load = 0
    loading = True

    class Counting(Audit):
        def _write(self, journal: Any, batch: Any) -> None:
            nonlocal sealed_under_load
            if loading:
                sealed_under_load += len(batch.finished) + len(batch.new)
            super()._write(journal, batch)

    log = Counting(store, _keys(settings))

    async def client(index: int) -> None:
        for call in range(25):
            async with log.call(CallRecord(method="tools/call", gateway="g", principal=None, name=f"c{index}-{call}")):
                await before_forwarding()  # on SQLite with free locks this need not give the loop a turn...
                await anyio.lowlevel.checkpoint()  # ...but waiting for the upstream's answer always does

    async with log.running():
        async with anyio.create_task_group() as tg:
            for index in range(16):
                tg.start_soon(client, index)
        loading = False
    assert sealed_under_load > 0
    assert len(await _outcomes(store)) == 16 * 25


async def _pending_names(store: Store) -> list[str]:
    async with store.transaction() as conn:
        query = sa.select(schema.audit_events.c.name).where(schema.audit_events.c.seq.is_(None))
        return sorted((await conn.execute(query)).scalars())


async def test_a_requests_commit_leaves_earlier_seals_to_the_drain_which_it_wakes_at_once(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drain's own delay is out of reach here: the first call's seal can only come from the second call's wake.
    monkeypatch.setattr("bastion.services.audit.SEAL_DELAY_S", 3600.0)
    written: list[tuple[list[str | None], list[str | None]]] = []
    sealed = anyio.Event()

    class Recording(Audit):
        def _write(self, journal: Any, batch: Any) -> None:
            written.append(([e.name for e in batch.pending], [e.name for e in batch.finished]))
            super()._write(journal, batch)

        async def _seal(self) -> None:
            await super()._seal()
            sealed.set()

    log = Recording(store, _keys(settings))
    async with log.running():
        await _request(log, "first")
        async with log.call(CallRecord(method="tools/call", gateway="g", principal=None, name="second")):
            await before_forwarding()
            with anyio.fail_after(10):  # a guard against hanging, not a measure of speed
                await sealed.wait()
            assert await _pending_names(store) == ["second"]  # sealed while the second call is still out
        assert written[:3] == [(["first"], []), (["second"], []), ([], ["first"])]
    assert [(o, n) for _s, o, n in await _outcomes(store)] == [("ok", "first"), ("ok", "second")]


async def test_settle_seals_what_was_decided_without_waiting_for_the_drain(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bastion.services.audit.SEAL_DELAY_S", 3600.0)
    log = Audit(store, _keys(settings))
    async with log.running():
        await _request(log, "answered")
        assert await _pending_names(store) == ["answered"]
        await log.settle()
        assert await _pending_names(store) == []
        assert [(o, n) for _s, o, n in await _outcomes(store)] == [("ok", "answered")]


async def test_a_request_cancelled_while_its_event_waits_to_be_written_leaves_no_row_to_clash_later(
    store: Store, settings: Settings
) -> None:
    # The caller hangs up while its pending row waits for the writer: its outcome is sealed on its own, and no
    # late pending row with the same id may reach the database afterwards (it would fail the next commit).
    log = Audit(store, _keys(settings))
    scopes: list[anyio.CancelScope] = []

    async def hung_up() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await _request(log, "hung-up")

    async with log.running():
        await log._lock.acquire()  # pyright: ignore[reportPrivateUsage]  the writer is busy
        async with anyio.create_task_group() as tg:
            tg.start_soon(hung_up)
            await anyio.wait_all_tasks_blocked()
            scopes[0].cancel()
        log._lock.release()  # pyright: ignore[reportPrivateUsage]
        await log.settle()
        await _request(log, "next")  # its commit would fail on the hung-up call's late pending row
    assert [(o, n) for _s, o, n in await _outcomes(store)] == [("error", "hung-up"), ("ok", "next")]
