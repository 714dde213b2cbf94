"""Audit rows in and out of the database: pending rows, sealing into the hash chain, the head and checkpoints.

The chain is one per install. Sealing takes the head row's lock (``FOR UPDATE`` on PostgreSQL; SQLite write
transactions are already exclusive), so replicas append to one chain in turn.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.domain.audit import GENESIS, AuditEvent, SealedEvent, chain_hash, head_mac, seal, sign_checkpoint

E = schema.audit_events
H = schema.audit_head
C = schema.audit_checkpoints
HEAD_ID: Final = 1
EVENT_FIELDS: Final = tuple(f.name for f in fields(AuditEvent))
_PENDING_AUDIT = "bastion_pending_audit"


@dataclass(frozen=True, slots=True)
class ChainKeys:
    chain: bytes = field(repr=False)
    checkpoint: bytes = field(repr=False)
    checkpoint_every: int = 1000  # a signed checkpoint each time the chain crosses a multiple of this


def _values(event: AuditEvent) -> dict[str, Any]:
    # Not dataclasses.asdict: its deep copy of every value cost more than the insert itself.
    return {name: getattr(event, name) for name in EVENT_FIELDS}


_LIMITS: Final = {
    c.name: c.type.length
    for c in E.columns
    if c.name in EVENT_FIELDS and isinstance(c.type, sa.String) and c.type.length is not None
}


def _storable(value: object, limit: int) -> str:
    # PostgreSQL text refuses NUL and the driver refuses lone surrogates: either would fail the whole batch.
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fit(event: AuditEvent) -> AuditEvent:
    """The event as its columns will store it, before it is hashed: a value the database changed would break
    the chain. Text is cut to the column size, made storable, and non-text values in text columns become text."""
    changes: dict[str, str] = {}
    for name, limit in _LIMITS.items():
        value = getattr(event, name)
        if value is not None and (stored := _storable(value, limit)) != value:
            changes[name] = stored
    return replace(event, **changes) if changes else event


def pending_mac(keys: ChainKeys, event: AuditEvent) -> str:
    """A pending row's MAC (kept in its ``hash`` column until sealed): recovery seals only rows we wrote."""
    return chain_hash(keys.chain, GENESIS, 0, event)


def event_of(row: sa.Row[Any]) -> AuditEvent:
    data = row._mapping  # pyright: ignore[reportPrivateUsage]
    return AuditEvent(**{name: data[name] for name in EVENT_FIELDS})


def record(conn: AsyncConnection, event: AuditEvent) -> None:
    """Queue an event on this transaction: it is sealed into the chain by the same commit as the change."""
    pending: list[AuditEvent] = conn.info.setdefault(_PENDING_AUDIT, [])
    pending.append(event)


def take_recorded(conn: AsyncConnection) -> list[AuditEvent]:
    return conn.info.pop(_PENDING_AUDIT, [])


def write_pending(conn: sa.Connection, keys: ChainKeys, events: Sequence[AuditEvent]) -> None:
    """Write events that are not in the chain yet (their call is about to be forwarded)."""
    if events:
        fitted = [fit(e) for e in events]
        rows = [{**_values(e), "seq": None, "prev_hash": None, "hash": pending_mac(keys, e)} for e in fitted]
        conn.execute(_INSERT, rows)


# Built once: constructing these (two dozen bind parameters each) cost more than executing them.
_INSERT: Final = sa.insert(E)
_HEAD: Final = sa.select(H.c.seq, H.c.hash).where(H.c.id == HEAD_ID)
_HEAD_LOCKED: Final = _HEAD.with_for_update()
_FOUND: Final = sa.select(E.c.id, E.c.seq).where(E.c.id.in_(sa.bindparam("ids", expanding=True)))
_CHANGING: Final = tuple(f for f in EVENT_FIELDS if f != "id")  # every field as hashed, so row and hash agree
_COMPLETE: Final = (
    sa.update(E)
    .where(E.c.id == sa.bindparam("b_id"), E.c.seq.is_(None))
    .values(
        seq=sa.bindparam("b_seq"),
        prev_hash=sa.bindparam("b_prev"),
        hash=sa.bindparam("b_hash"),
        **{f: sa.bindparam(f"b_{f}") for f in _CHANGING},
    )
)
_MOVE_HEAD: Final = (
    sa.update(H)
    .where(H.c.id == HEAD_ID)
    .values(
        seq=sa.bindparam("h_seq"),
        hash=sa.bindparam("h_hash"),
        mac=sa.bindparam("h_mac"),
        updated_at=sa.bindparam("h_at"),
    )
)


def _lock_head(conn: sa.Connection, keys: ChainKeys) -> tuple[int, str]:
    query = _HEAD_LOCKED if conn.dialect.name == "postgresql" else _HEAD
    row = conn.execute(query).first()
    if row is not None:
        return int(row.seq), str(row.hash)
    now = datetime.now(UTC)
    values = {"id": HEAD_ID, "seq": 0, "hash": GENESIS, "mac": head_mac(keys.chain, 0, GENESIS), "updated_at": now}
    insert = (postgresql.insert(H) if conn.dialect.name == "postgresql" else sqlite.insert(H)).values(values)
    conn.execute(insert.on_conflict_do_nothing(index_elements=[H.c.id]))
    row = conn.execute(query).one()
    return int(row.seq), str(row.hash)


def append(
    conn: sa.Connection, keys: ChainKeys, *, new: Sequence[AuditEvent] = (), finished: Sequence[AuditEvent] = ()
) -> list[SealedEvent]:
    """Append events to the chain: ``new`` ones are inserted, ``finished`` ones are pending rows now complete."""
    if not new and not finished:
        return []
    prev_seq, prev_hash = _lock_head(conn, keys)
    # Under the head lock, each event by what its row is now, whatever the caller believed: a row already sealed
    # (another replica's recovery sealed it as interrupted) stays as it is; a pending row is completed, even when
    # the request that wrote it was cancelled before it learnt so; only events with no row are inserted.
    wanted = {e.id: e for e in (*finished, *new)}
    found = {row.id: row.seq for row in conn.execute(_FOUND, {"ids": list(wanted)})}
    finished = [e for e in wanted.values() if e.id in found and found[e.id] is None]
    new = [e for e in wanted.values() if e.id not in found]
    if not finished and not new:
        return []
    # In the order the requests started (a refusal sealed with later calls' outcomes still comes first).
    pending_ids = {e.id for e in finished}
    ordered = [fit(e) for e in sorted((*finished, *new), key=lambda e: e.occurred_at)]
    sealed = seal(keys.chain, prev_seq, prev_hash, ordered)
    completing = [s for s in sealed if s.event.id in pending_ids]
    inserting = [s for s in sealed if s.event.id not in pending_ids]
    if completing:
        params = [
            {
                "b_id": s.event.id,
                "b_seq": s.seq,
                "b_prev": s.prev_hash,
                "b_hash": s.hash,
                **{f"b_{f}": getattr(s.event, f) for f in _CHANGING},
            }
            for s in completing
        ]
        conn.execute(_COMPLETE, params)
    if inserting:
        conn.execute(
            _INSERT, [{**_values(s.event), "seq": s.seq, "prev_hash": s.prev_hash, "hash": s.hash} for s in inserting]
        )
    last = sealed[-1]
    now = datetime.now(UTC)
    conn.execute(
        _MOVE_HEAD,
        {"h_seq": last.seq, "h_hash": last.hash, "h_mac": head_mac(keys.chain, last.seq, last.hash), "h_at": now},
    )
    if keys.checkpoint_every and last.seq // keys.checkpoint_every > prev_seq // keys.checkpoint_every:
        checkpoint = sign_checkpoint(keys.checkpoint, last.seq, last.hash, now)
        conn.execute(
            sa.insert(C).values(
                seq=checkpoint.seq,
                hash=checkpoint.hash,
                created_at=checkpoint.created_at,
                signature=checkpoint.signature,
            )
        )
    return sealed


# Synchronous on purpose: the audit writer runs them in one worker-thread hop per transaction (``Store.write``);
# the async wrapper below serves a transaction already open on an AsyncConnection (admin actions).


async def seal_into_chain(
    conn: AsyncConnection, keys: ChainKeys, *, new: Sequence[AuditEvent] = (), finished: Sequence[AuditEvent] = ()
) -> list[SealedEvent]:
    """Append events to the chain: ``new`` ones are inserted, ``finished`` ones are pending rows now complete."""
    return await conn.run_sync(lambda sync: append(sync, keys, new=new, finished=finished))


def stale_pending(conn: sa.Connection, keys: ChainKeys, before: datetime, limit: int) -> list[tuple[AuditEvent, bool]]:
    """Pending rows older than ``before`` (calls whose process died before their outcome was written), each with
    whether its MAC holds (False: the row was altered or forged in the database)."""
    query = sa.select(E).where(E.c.seq.is_(None), E.c.occurred_at < before).order_by(E.c.occurred_at).limit(limit)
    found: list[tuple[AuditEvent, bool]] = []
    for row in conn.execute(query).all():
        event = event_of(row)
        found.append((event, row.hash is not None and hmac.compare_digest(row.hash, pending_mac(keys, event))))
    return found
