"""Audit rows in the database: sealed events read back verify, whatever sizes the caller sent."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from bastion.db import audit as rows
from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.audit import AuditEvent, SealedEvent, verify
from bastion.domain.ids import new_id

pytestmark = pytest.mark.anyio


def _event(**fields: object) -> AuditEvent:
    base: dict[str, object] = {
        "id": new_id(),
        "occurred_at": datetime.now(UTC),
        "kind": "mcp",
        "method": "tools/call",
        "outcome": "ok",
    }
    return AuditEvent(**{**base, **fields})  # type: ignore[arg-type]


async def _sealed(store: Store) -> tuple[list[SealedEvent], tuple[int, str, str]]:
    async with store.transaction() as conn:
        found = (await conn.execute(sa.select(schema.audit_events).order_by(schema.audit_events.c.seq))).all()
        head = (await conn.execute(sa.select(schema.audit_head))).one()
    events = [SealedEvent(r.seq, r.prev_hash, r.hash, rows.event_of(r)) for r in found if r.seq is not None]
    return events, (head.seq, head.hash, head.mac)


async def test_oversized_values_are_cut_before_hashing_so_the_stored_chain_verifies(store: Store) -> None:
    assert store.audit is not None
    keys = store.audit
    long_name = "x" * 5000
    async with store.transaction() as conn:
        pending = _event(name=long_name, outcome="pending")
        await conn.run_sync(lambda sync: rows.write_pending(rows.Journal.on(sync), keys, [pending]))
    async with store.transaction() as conn:
        await rows.seal_into_chain(
            conn,
            store.audit,
            finished=[_event(id=pending.id, occurred_at=pending.occurred_at, name=long_name, reason="r" * 900)],
            new=[_event(method="http", outcome="refused", actor="a" * 400, detail={"note": "ünïcode ✓", "n": 1.5})],
        )
    events, head = await _sealed(store)
    assert [e.seq for e in events] == [1, 2]
    assert len(events[0].event.name or "") == 512 and (events[0].event.name or "").endswith("…")
    assert len(events[0].event.reason or "") == 500
    verdict = verify(events, chain_key=store.audit.chain, checkpoint_key=store.audit.checkpoint, head=head)
    assert verdict.ok, verdict.broken


async def test_an_outcome_for_an_event_already_sealed_as_interrupted_does_not_break_the_chain(store: Store) -> None:
    assert store.audit is not None
    keys = store.audit
    pending = _event(outcome="pending")
    async with store.transaction() as conn:
        await conn.run_sync(lambda sync: rows.write_pending(rows.Journal.on(sync), keys, [pending]))
    async with store.transaction() as conn:
        await rows.seal_into_chain(conn, store.audit, finished=[_event(id=pending.id, outcome="interrupted")])
    async with store.transaction() as conn:
        late = await rows.seal_into_chain(conn, store.audit, finished=[_event(id=pending.id, outcome="ok")])
    assert late == []
    events, head = await _sealed(store)
    assert [(e.seq, e.event.outcome) for e in events] == [(1, "interrupted")]
    assert verify(events, chain_key=store.audit.chain, checkpoint_key=store.audit.checkpoint, head=head).ok


async def test_a_checkpoint_is_signed_each_time_the_chain_crosses_the_interval(store: Store) -> None:
    assert store.audit is not None
    keys = rows.ChainKeys(store.audit.chain, store.audit.checkpoint, checkpoint_every=3)
    for _ in range(4):
        async with store.transaction() as conn:
            await rows.seal_into_chain(conn, keys, new=[_event(), _event()])
    async with store.transaction() as conn:
        seqs = (await conn.execute(sa.select(schema.audit_checkpoints.c.seq))).scalars().all()
    assert sorted(seqs) == [4, 6]  # the batches ending at 4 and 6 crossed 3 and 6


async def test_an_event_whose_pending_row_was_written_unbeknown_to_its_request_is_completed_not_duplicated(
    store: Store,
) -> None:
    # A request cancelled while another committed its pending row never learnt it was written: its outcome then
    # arrives as a new event with the same id, and must complete that row rather than fail the whole batch.
    assert store.audit is not None
    keys = store.audit
    pending = _event(outcome="pending")
    async with store.transaction() as conn:
        await conn.run_sync(lambda sync: rows.write_pending(rows.Journal.on(sync), keys, [pending]))
    other = _event()
    async with store.transaction() as conn:
        await rows.seal_into_chain(
            conn, store.audit, new=[_event(id=pending.id, occurred_at=pending.occurred_at), other]
        )
    events, head = await _sealed(store)
    assert [(e.seq, e.event.id, e.event.outcome) for e in events] == [(1, pending.id, "ok"), (2, other.id, "ok")]
    assert verify(events, chain_key=store.audit.chain, checkpoint_key=store.audit.checkpoint, head=head).ok
