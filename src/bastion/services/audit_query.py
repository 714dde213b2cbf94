"""Reading the audit log: filtered pages, streamed exports, chain verification, checkpoints and pruning.

Listing and export see only the caller's workspace. Verification, checkpoints and pruning are install-wide, like
the chain itself, and need the audit key rather than a capability (they run from the server's shell).
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import os
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.audit import EVENT_FIELDS, HEAD_ID, event_of
from bastion.db.crud import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page
from bastion.db.store import Store
from bastion.domain import audit, ids
from bastion.domain.actor import Actor
from bastion.domain.audit import AuditEvent, Break, Checkpoint, SealedEvent, TamperKind, Verdict
from bastion.domain.capabilities import Capability
from bastion.errors import Conflict, NotFound, ValidationFailed

E = schema.audit_events
H = schema.audit_head
C = schema.audit_checkpoints
BATCH_ROWS: Final = 500  # rows per query when exporting or verifying: memory stays bounded on any length of log
EXPORT_COLUMNS: Final = ("seq", "prev_hash", "hash", *EVENT_FIELDS)
# Spreadsheets run a cell that starts with one of these as a formula; logged tool names and previews are untrusted.
_FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")

ExportFormat = Literal["jsonl", "csv"]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored row: the event and its place in the chain (all three None while the event is pending)."""

    event: AuditEvent
    seq: int | None
    prev_hash: str | None
    hash: str | None

    @property
    def pending(self) -> bool:
        return self.seq is None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What to look for; every field given must match. ``since`` is inclusive, ``until`` exclusive (naive = UTC)."""

    member: str | None = None  # member id or email: matches the member id or the recorded actor
    host: str | None = None  # host id or name
    gateway: str | None = None  # gateway slug
    server: str | None = None
    name: str | None = None  # tool, prompt or resource name
    outcome: str | None = None
    method: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None


# --- rows ------------------------------------------------------------------------------------------------------------


def row_to_record(row: sa.Row[Any]) -> AuditRecord:
    return AuditRecord(event_of(row), row.seq, row.prev_hash, row.hash)


def row_to_sealed(row: sa.Row[Any]) -> SealedEvent | None:
    """The row as a link of the chain; None while it is pending (not in the chain yet)."""
    if row.seq is None:
        return None
    return SealedEvent(seq=int(row.seq), prev_hash=row.prev_hash or "", hash=row.hash or "", event=event_of(row))


def _checkpoint_of(row: sa.Row[Any]) -> Checkpoint:
    return Checkpoint(seq=int(row.seq), hash=row.hash, created_at=row.created_at, signature=row.signature)


def record_json(record: AuditRecord) -> dict[str, Any]:
    """A record as one JSON object: chain fields first, then every event field (times in ISO 8601)."""
    out: dict[str, Any] = {"seq": record.seq, "prev_hash": record.prev_hash, "hash": record.hash}
    for name in EVENT_FIELDS:
        value = getattr(record.event, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


# --- filters and cursors ---------------------------------------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment.astimezone(UTC)


async def _where(conn: AsyncConnection, workspace_id: str, flt: AuditFilter) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = [E.c.workspace == workspace_id]
    if flt.member is not None:
        ids = {flt.member}
        m = schema.members
        found = await conn.execute(
            sa.select(m.c.id).where(
                m.c.workspace_id == workspace_id, sa.or_(m.c.id == flt.member, m.c.email == flt.member.strip().lower())
            )
        )
        ids.update(found.scalars())
        where.append(sa.or_(E.c.member_id.in_(sorted(ids)), E.c.actor == flt.member))
    if flt.host is not None:
        h = schema.hosts
        named = sa.select(h.c.id).where(
            h.c.workspace_id == workspace_id, sa.or_(h.c.id == flt.host, h.c.name == flt.host)
        )
        host_id = (await conn.execute(named)).scalar_one_or_none()
        # A host deleted since keeps its id in the log: an unknown name is looked for as an id.
        where.append(E.c.host_id == (host_id or flt.host))
    for column, value in (
        (E.c.gateway, flt.gateway),
        (E.c.server, flt.server),
        (E.c.name, flt.name),
        (E.c.outcome, flt.outcome),
        (E.c.method, flt.method),
        (E.c.kind, flt.kind),
    ):
        if value is not None:
            where.append(column == value)
    if flt.since is not None:
        where.append(E.c.occurred_at >= _utc(flt.since))
    if flt.until is not None:
        where.append(E.c.occurred_at < _utc(flt.until))
    return where


# A page's position: the last event's time (microseconds since the epoch) and id, so the newest-first order resumes
# exactly after it. The pattern is also the API document's.
AUDIT_CURSOR_PATTERN: Final = rf"^[0-9]{{1,16}}_{ids.ID_PATTERN[1:-1]}$"
_AUDIT_CURSOR_RE: Final = re.compile(AUDIT_CURSOR_PATTERN)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _encode_cursor(occurred_at: datetime, event_id: str) -> str:
    micros = (_utc(occurred_at) - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{event_id}"


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    if not _AUDIT_CURSOR_RE.fullmatch(cursor):
        raise ValidationFailed("cursor is not one this API returned", field="cursor")
    micros, _, event_id = cursor.partition("_")
    return _EPOCH + timedelta(microseconds=int(micros)), event_id


# --- listing ---------------------------------------------------------------------------------------------------------


async def list_page(
    store: Store, actor: Actor, flt: AuditFilter, cursor: str | None = None, limit: int | None = None
) -> Page[AuditRecord]:
    """The workspace's events, newest first (pending ones included)."""
    actor.require(Capability.AUDIT_VIEW_EXPORT)
    size = DEFAULT_PAGE_SIZE if limit is None else limit
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ValidationFailed(f"limit must be between 1 and {MAX_PAGE_SIZE}", field="limit")
    async with store.transaction() as conn:
        where = await _where(conn, actor.workspace_id, flt)
        if cursor is not None:
            at, event_id = _decode_cursor(cursor)
            where.append(sa.or_(E.c.occurred_at < at, sa.and_(E.c.occurred_at == at, E.c.id < event_id)))
        query = sa.select(E).where(*where).order_by(E.c.occurred_at.desc(), E.c.id.desc()).limit(size + 1)
        found = [row_to_record(r) for r in (await conn.execute(query)).all()]
    if len(found) > size:
        last = found[size - 1].event
        return Page(found[:size], _encode_cursor(last.occurred_at, last.id))
    return Page(found, None)


async def get(store: Store, actor: Actor, event_id: str) -> AuditRecord:
    actor.require(Capability.AUDIT_VIEW_EXPORT)
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(E).where(E.c.id == event_id, E.c.workspace == actor.workspace_id))).first()
    if row is None:
        raise NotFound("no such audit event")
    return row_to_record(row)


# --- export ----------------------------------------------------------------------------------------------------------


async def _records(store: Store, actor: Actor, flt: AuditFilter) -> AsyncIterator[list[AuditRecord]]:
    """The filtered records in chain order, then the pending ones by id; one short transaction per batch."""
    for sealed in (True, False):
        after: int | str | None = None
        while True:
            async with store.transaction() as conn:
                where = await _where(conn, actor.workspace_id, flt)
                key = E.c.seq if sealed else E.c.id
                where.append(E.c.seq.is_not(None) if sealed else E.c.seq.is_(None))
                if after is not None:
                    where.append(key > after)
                query = sa.select(E).where(*where).order_by(key).limit(BATCH_ROWS)
                batch = [row_to_record(r) for r in (await conn.execute(query)).all()]
            # Yielded outside the transaction: a slow reader must not hold the database (SQLite's write lock).
            if batch:
                yield batch
            if len(batch) < BATCH_ROWS:
                break
            after = batch[-1].seq if sealed else batch[-1].event.id


def _csv_cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_lines(rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()


async def export(store: Store, actor: Actor, flt: AuditFilter, fmt: ExportFormat) -> AsyncIterator[str]:
    """The workspace's events as JSON Lines or CSV text, streamed a batch at a time, oldest first.

    JSON Lines keep every value as stored (one event per line, with seq/prev_hash/hash). CSV is for people and
    spreadsheets: a header line, ``detail`` as JSON in one column, and text that a spreadsheet would run as a
    formula prefixed with ``'``.
    """
    actor.require(Capability.AUDIT_VIEW_EXPORT)
    if fmt not in ("jsonl", "csv"):
        raise ValidationFailed("format must be jsonl or csv", field="format")
    if fmt == "csv":
        yield _csv_lines([EXPORT_COLUMNS])
    async for batch in _records(store, actor, flt):
        if fmt == "jsonl":
            yield "".join(json.dumps(record_json(r), ensure_ascii=False) + "\n" for r in batch)
        else:
            yield _csv_lines(
                [
                    [r.seq, r.prev_hash, r.hash, *(_csv_cell(getattr(r.event, name)) for name in EVENT_FIELDS)]
                    for r in batch
                ]
            )


# --- verification ----------------------------------------------------------------------------------------------------


async def _sealed_batch(store: Store, after: int, upto: int | None) -> list[SealedEvent]:
    async with store.transaction() as conn:
        query = sa.select(E).where(E.c.seq.is_not(None), E.c.seq > after)
        if upto is not None:
            query = query.where(E.c.seq <= upto)
        rows = (await conn.execute(query.order_by(E.c.seq).limit(BATCH_ROWS))).all()
    return [s for s in (row_to_sealed(r) for r in rows) if s is not None]


async def _head(conn: AsyncConnection) -> tuple[int, str, str] | None:
    row = (await conn.execute(sa.select(H.c.seq, H.c.hash, H.c.mac).where(H.c.id == HEAD_ID))).first()
    return None if row is None else (int(row.seq), str(row.hash), str(row.mac))


async def _beyond_head(store: Store) -> Break | None:
    """A sealed row past the chain head: every real append moves the head in the same commit."""
    async with store.transaction() as conn:
        # The last seq before the head: a commit landing in between moves the head past it, never the other way.
        last = (await conn.execute(sa.select(sa.func.max(E.c.seq)))).scalar_one_or_none()
        head = await _head(conn)
    if last is None:
        return None
    if head is None:
        return Break(TamperKind.DELETED, int(last), f"the chain head record was deleted (events up to {last} exist)")
    if int(last) > head[0]:
        detail = f"events from {head[0] + 1} to {last} were inserted after the chain head ({head[0]})"
        return Break(TamperKind.INSERTED, head[0] + 1, detail)
    return None


async def verify(store: Store, audit_key: bytes, extra_checkpoints: Sequence[Checkpoint] = ()) -> Verdict:
    """Check the whole chain (every workspace), its head, and the stored checkpoints and ``extra_checkpoints``.

    Rows are streamed in batches into the pure verifier, which runs in a worker thread; the events sealed while it
    runs (past the head read at the start) are left for the next run.
    """
    chain_key = audit.derive_key(audit_key, "chain")
    checkpoint_key = audit.derive_key(audit_key, "checkpoint")
    async with store.transaction() as conn:
        # Checkpoints before the head: each was written at or below the head of its time, so none is past this one.
        stored = [_checkpoint_of(r) for r in (await conn.execute(sa.select(C).order_by(C.c.seq))).all()]
        head = await _head(conn)
    upto = head[0] if head is not None else None

    def events() -> Iterator[SealedEvent]:
        after = 0
        while True:
            batch = anyio.from_thread.run(_sealed_batch, store, after, upto)
            yield from batch
            if len(batch) < BATCH_ROWS:
                return
            after = batch[-1].seq

    def run() -> Verdict:
        return audit.verify(
            events(),
            chain_key=chain_key,
            checkpoint_key=checkpoint_key,
            head=head,
            checkpoints=[*stored, *extra_checkpoints],
        )

    verdict = await anyio.to_thread.run_sync(run)
    if verdict.ok:
        broken = await _beyond_head(store)
        if broken is not None:
            return Verdict(verdict.checked, verdict.first_seq, verdict.last_seq, broken)
    return verdict


# --- checkpoints -----------------------------------------------------------------------------------------------------


async def _checkpoint_at(conn: AsyncConnection, seq: int) -> Checkpoint | None:
    row = (await conn.execute(sa.select(C).where(C.c.seq == seq))).first()
    return None if row is None else _checkpoint_of(row)


async def _store_checkpoint(conn: AsyncConnection, checkpoint_key: bytes, seq: int, hash_: str) -> Checkpoint:
    """The checkpoint for ``seq``: the one already stored (it must vouch for ``hash_``), or a new signed one."""
    existing = await _checkpoint_at(conn, seq)
    if existing is None:
        fresh = audit.sign_checkpoint(checkpoint_key, seq, hash_, datetime.now(UTC))
        try:
            async with conn.begin_nested():
                await conn.execute(
                    sa.insert(C).values(
                        seq=fresh.seq, hash=fresh.hash, created_at=fresh.created_at, signature=fresh.signature
                    )
                )
            return fresh
        except IntegrityError:  # another replica checkpointed the same event meanwhile
            existing = await _checkpoint_at(conn, seq)
            if existing is None:
                raise
    if not hmac.compare_digest(existing.hash, hash_):
        raise Conflict(f"the stored checkpoint for event {seq} disagrees with the log; run `bastion audit verify`")
    return existing


async def make_checkpoint(store: Store, audit_key: bytes) -> Checkpoint | None:
    """Sign (and store) a checkpoint of the chain head; the one already stored for it if any; None for no events."""
    chain_key = audit.derive_key(audit_key, "chain")
    async with store.transaction() as conn:
        head = await _head(conn)
        if head is None or head[0] == 0:
            return None
        seq, hash_, mac = head
        # Signing a forged head would vouch for it.
        if not hmac.compare_digest(audit.head_mac(chain_key, seq, hash_), mac):
            raise Conflict("the chain head record fails its MAC; run `bastion audit verify`")
        return await _store_checkpoint(conn, audit.derive_key(audit_key, "checkpoint"), seq, hash_)


async def prune(store: Store, audit_key: bytes, before: datetime) -> int:
    """Delete the oldest sealed events, those before the first one not older than ``before``; return how many.

    The log is verified first (pruning must not erase evidence), and a checkpoint is stored for the newest event
    deleted, so verification starts from it afterwards. Pending events are never deleted.

    Raises:
        Conflict: the log does not verify.
    """
    before = _utc(before)
    verdict = await verify(store, audit_key)
    if verdict.broken is not None:
        b = verdict.broken
        raise Conflict(f"refusing to prune: the audit log is broken at seq {b.seq} ({b.kind.value}: {b.detail})")
    async with store.transaction() as conn:
        keep_from = (
            await conn.execute(sa.select(sa.func.min(E.c.seq)).where(E.c.seq.is_not(None), E.c.occurred_at >= before))
        ).scalar_one_or_none()
        query = sa.select(E.c.seq, E.c.hash).where(E.c.seq.is_not(None), E.c.occurred_at < before)
        if keep_from is not None:
            query = query.where(E.c.seq < keep_from)
        boundary = (await conn.execute(query.order_by(E.c.seq.desc()).limit(1))).first()
        if boundary is None:
            return 0
        seq = int(boundary.seq)
        await _store_checkpoint(conn, audit.derive_key(audit_key, "checkpoint"), seq, str(boundary.hash))
        result = await conn.execute(sa.delete(E).where(E.c.seq.is_not(None), E.c.seq <= seq))
        return int(result.rowcount)


# --- checkpoint files (kept outside the database) --------------------------------------------------------------------


def load_checkpoints_file(path: Path) -> list[Checkpoint]:
    """Every checkpoint in a JSON Lines file (blank lines skipped). Signatures are checked by ``verify``.

    Raises:
        ValidationFailed: the file cannot be read, or a line is not a checkpoint (the line is named).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(f"{path} is not UTF-8 text", field="checkpoints") from None
    except OSError as exc:
        raise ValidationFailed(f"cannot read {path} ({exc.strerror or 'error'})", field="checkpoints") from None
    found: list[Checkpoint] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            found.append(Checkpoint.from_json(json.loads(line)))
        except json.JSONDecodeError:
            raise ValidationFailed(f"{path}:{number} is not JSON", field="checkpoints") from None
        except ValidationFailed as exc:
            raise ValidationFailed(f"{path}:{number}: {exc.detail}", field="checkpoints") from None
    return found


def append_checkpoint_file(path: Path, checkpoint: Checkpoint) -> None:
    """Add ``checkpoint`` as one JSON line to ``path`` (created if missing), flushed to disk before returning."""
    line = json.dumps(checkpoint.to_json(), sort_keys=True) + "\n"
    try:
        with path.open("a+b") as out:
            if out.seek(0, os.SEEK_END) > 0:
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":  # a last line someone left unfinished stays a line of its own
                    line = "\n" + line
            out.write(line.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise ValidationFailed(f"cannot write {path} ({exc.strerror or 'error'})", field="append") from None
