"""Audit rows in and out of the database: pending rows, sealing into the hash chain, the head and checkpoints.

The chain is one per install. Sealing takes the head row's lock (``FOR UPDATE`` on PostgreSQL; SQLite write
transactions are already exclusive), so replicas append to one chain in turn.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import SQLCompiler

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


def write_pending(journal: Journal, keys: ChainKeys, events: Sequence[AuditEvent]) -> None:
    """Write events that are not in the chain yet (their call is about to be forwarded)."""
    if events:
        fitted = [fit(e) for e in events]
        rows = [{**_values(e), "seq": None, "prev_hash": None, "hash": pending_mac(keys, e)} for e in fitted]
        journal.run(journal.statements.insert, rows)


# The chain's statements run on the driver's own cursor: SQLAlchemy's per-statement work (compiled-cache look-up,
# parameter construction, events, a result object) cost several times what SQLite takes to run them, and an
# audit write precedes every forwarded call. They are still built with SQLAlchemy, once per dialect, so the table
# definition stays the one source of their SQL and of how each value is bound (times, JSON).
_INSERT: Final = sa.insert(E)
_INSERT_KEYS: Final = tuple(c.name for c in E.columns)
_HEAD: Final = sa.select(H.c.seq, H.c.hash).where(H.c.id == sa.bindparam("h_id"))
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
    .where(H.c.id == sa.bindparam("h_id"))
    .values(
        seq=sa.bindparam("h_seq"),
        hash=sa.bindparam("h_hash"),
        mac=sa.bindparam("h_mac"),
        updated_at=sa.bindparam("h_at"),
    )
)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One statement compiled for one driver: its SQL, and how each named value becomes a driver parameter."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    positional: bool

    @classmethod
    def of(cls, statement: sa.ClauseElement, dialect: Dialect, keys: Sequence[str] | None = None) -> _Prepared:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys) if keys else None))
        names = tuple(compiled.positiontup or ()) if dialect.positional else tuple(compiled.binds)
        processors = tuple(compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names)
        return cls(compiled.string, names, processors, dialect.positional)

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        # None goes through its processor too: JSON stores it as JSON null, as SQLAlchemy's own execution does.
        converted = [values[n] if p is None else p(values[n]) for n, p in zip(self.names, self.processors, strict=True)]
        return tuple(converted) if self.positional else dict(zip(self.names, converted, strict=True))


@dataclass(frozen=True, slots=True)
class Statements:
    """The chain's statements as one driver takes them."""

    insert: _Prepared
    head_locked: _Prepared
    complete: _Prepared
    move_head: _Prepared
    found_prefix: str
    placeholder: str

    @classmethod
    def of(cls, dialect: Dialect) -> Statements:
        head_locked = _HEAD.with_for_update() if dialect.name == "postgresql" else _HEAD
        found = sa.select(E.c.id, E.c.seq).compile(dialect=dialect).string
        return cls(
            insert=_Prepared.of(_INSERT, dialect, _INSERT_KEYS),
            head_locked=_Prepared.of(head_locked, dialect),
            complete=_Prepared.of(_COMPLETE, dialect),
            move_head=_Prepared.of(_MOVE_HEAD, dialect),
            found_prefix=f"{found} WHERE {E.name}.id IN ",
            placeholder="?" if dialect.paramstyle == "qmark" else "%s",
        )

    def found(self, count: int) -> str:
        return self.found_prefix + "(" + ", ".join([self.placeholder] * count) + ")"


_STATEMENTS: dict[tuple[str, str], Statements] = {}


def statements_for(dialect: Dialect) -> Statements:
    key = (dialect.name, dialect.driver)
    if (found := _STATEMENTS.get(key)) is None:
        found = _STATEMENTS[key] = Statements.of(dialect)
    return found


@dataclass(slots=True)
class Journal:
    """A driver cursor inside an open write transaction, and the statements its driver takes.

    Driver errors come out as SQLAlchemy's (``IntegrityError``, ``OperationalError`` …), parameters hidden."""

    cursor: Any
    dialect: Dialect
    statements: Statements = field(init=False)

    def __post_init__(self) -> None:
        self.statements = statements_for(self.dialect)

    @classmethod
    def on(cls, conn: sa.Connection) -> Journal:
        """The journal of a SQLAlchemy connection's transaction (admin actions seal on their own transaction).

        Use it as a context manager: its cursor is closed on the way out."""
        return cls(conn.connection.cursor(), conn.dialect)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cursor.close()

    def run(self, statement: _Prepared, rows: Sequence[Mapping[str, Any]]) -> None:
        self._call(statement.sql, [statement.parameters(r) for r in rows], many=True)

    def rows(self, statement: _Prepared, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        self._call(statement.sql, statement.parameters(values), many=False)
        return list(self.cursor.fetchall())

    def found(self, ids: Sequence[str]) -> dict[str, int | None]:
        self._call(self.statements.found(len(ids)), tuple(ids), many=False)
        return {row[0]: row[1] for row in self.cursor.fetchall()}

    def _call(self, sql: str, parameters: Any, *, many: bool) -> None:
        dbapi = self.dialect.loaded_dbapi
        try:
            if many:
                self.cursor.executemany(sql, parameters)
            else:
                self.cursor.execute(sql, parameters)
        except dbapi.Error as exc:
            raise driver_error(self.dialect, exc, sql) from exc


def driver_error(dialect: Dialect, error: BaseException, statement: str | None = None) -> BaseException:
    """A driver's error as SQLAlchemy raises it (``IntegrityError``, ``OperationalError`` …), parameters hidden."""
    dbapi_error = dialect.loaded_dbapi.Error
    return DBAPIError.instance(statement, None, error, dbapi_error, hide_parameters=True, dialect=dialect)


def _lock_head(journal: Journal, keys: ChainKeys) -> tuple[int, str]:
    found = journal.rows(journal.statements.head_locked, {"h_id": HEAD_ID})
    if found:
        return int(found[0][0]), str(found[0][1])
    # The first event of an install: the head starts at genesis (whichever replica gets there first).
    now = datetime.now(UTC)
    values = {"id": HEAD_ID, "seq": 0, "hash": GENESIS, "mac": head_mac(keys.chain, 0, GENESIS), "updated_at": now}
    insert = postgresql.insert(H) if journal.dialect.name == "postgresql" else sqlite.insert(H)
    create = _Prepared.of(insert.on_conflict_do_nothing(index_elements=[H.c.id]), journal.dialect, list(values))
    journal.run(create, [values])
    seq, head = journal.rows(journal.statements.head_locked, {"h_id": HEAD_ID})[0]
    return int(seq), str(head)


def append(
    journal: Journal, keys: ChainKeys, *, new: Sequence[AuditEvent] = (), finished: Sequence[AuditEvent] = ()
) -> list[SealedEvent]:
    """Append events to the chain: ``new`` ones are inserted, ``finished`` ones are pending rows now complete."""
    if not new and not finished:
        return []
    prev_seq, prev_hash = _lock_head(journal, keys)
    # Under the head lock, each event by what its row is now, whatever the caller believed: a row already sealed
    # (another replica's recovery sealed it as interrupted) stays as it is; a pending row is completed, even when
    # the request that wrote it was cancelled before it learnt so; only events with no row are inserted.
    wanted = {e.id: e for e in (*finished, *new)}
    found = journal.found(list(wanted))
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
    statements = journal.statements
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
        journal.run(statements.complete, params)
    if inserting:
        journal.run(
            statements.insert,
            [{**_values(s.event), "seq": s.seq, "prev_hash": s.prev_hash, "hash": s.hash} for s in inserting],
        )
    last = sealed[-1]
    now = datetime.now(UTC)
    mac = head_mac(keys.chain, last.seq, last.hash)
    journal.run(
        statements.move_head, [{"h_id": HEAD_ID, "h_seq": last.seq, "h_hash": last.hash, "h_mac": mac, "h_at": now}]
    )
    if keys.checkpoint_every and last.seq // keys.checkpoint_every > prev_seq // keys.checkpoint_every:
        checkpoint = sign_checkpoint(keys.checkpoint, last.seq, last.hash, now)
        values = {
            "seq": checkpoint.seq,
            "hash": checkpoint.hash,
            "created_at": checkpoint.created_at,
            "signature": checkpoint.signature,
        }
        journal.run(_Prepared.of(sa.insert(C), journal.dialect, list(values)), [values])
    return sealed


# Synchronous on purpose: the audit writer runs them in one worker-thread hop per transaction (``Store.journal``);
# the async wrapper below serves a transaction already open on an AsyncConnection (admin actions).


async def seal_into_chain(
    conn: AsyncConnection, keys: ChainKeys, *, new: Sequence[AuditEvent] = (), finished: Sequence[AuditEvent] = ()
) -> list[SealedEvent]:
    """Append events to the chain: ``new`` ones are inserted, ``finished`` ones are pending rows now complete."""

    def sealed(sync: sa.Connection) -> list[SealedEvent]:
        with Journal.on(sync) as journal:
            return append(journal, keys, new=new, finished=finished)

    return await conn.run_sync(sealed)


def stale_pending(conn: sa.Connection, keys: ChainKeys, before: datetime, limit: int) -> list[tuple[AuditEvent, bool]]:
    """Pending rows older than ``before`` (calls whose process died before their outcome was written), each with
    whether its MAC holds (False: the row was altered or forged in the database)."""
    query = sa.select(E).where(E.c.seq.is_(None), E.c.occurred_at < before).order_by(E.c.occurred_at).limit(limit)
    found: list[tuple[AuditEvent, bool]] = []
    for row in conn.execute(query).all():
        event = event_of(row)
        found.append((event, row.hash is not None and hmac.compare_digest(row.hash, pending_mac(keys, event))))
    return found
