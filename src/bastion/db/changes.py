"""Committed changes across processes on the embedded (SQLite) database.

Every transaction that emits change events also writes them to ``change_log``; a process reads the rows other
processes wrote and publishes them on its own bus, as PostgreSQL's LISTEN/NOTIFY does for replicas. Checking is
cheap enough to do before every request: ``PRAGMA data_version`` on a connection of its own says whether any
other connection has committed since the last look (a few microseconds), and only then is the log read.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db.schema import change_log
from bastion.events.bus import Changed, Subject

KEEP: Final = timedelta(hours=1)  # a process that misses more than the kept rows (asleep an hour) drops everything


async def record(conn: AsyncConnection, events: Sequence[Changed]) -> list[int]:
    """Write ``events`` on this transaction; their sequence numbers (this process skips its own when reading)."""
    at = datetime.now(UTC)
    seqs: list[int] = []
    for event in events:
        inserted = await conn.execute(
            change_log.insert()
            .values(subject=event.subject.value, object_id=event.id, at=at)
            .returning(change_log.c.seq)
        )
        seqs.append(inserted.scalar_one())
    return seqs


async def prune(conn: AsyncConnection, *, now: datetime | None = None) -> int:
    """Delete rows older than ``KEEP``, always keeping the newest (it tells readers where the log is)."""
    cutoff = (now or datetime.now(UTC)) - KEEP
    newest = sa.select(sa.func.max(change_log.c.seq)).scalar_subquery()
    result = await conn.execute(change_log.delete().where(change_log.c.at < cutoff, change_log.c.seq < newest))
    return result.rowcount


class ChangeWatcher:
    """Reads what other processes committed to ``change_log`` since the last look."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._version: int | None = None
        self._last = 0
        self._own: set[int] = set()
        self._lock = threading.Lock()

    def committed(self, seqs: Iterable[int]) -> None:
        """This process's own rows: already published here, skipped when read."""
        with self._lock:
            self._own.update(seqs)

    def poll(self) -> list[Changed]:
        """Events other processes committed since the last poll, oldest first."""
        with self._lock:
            try:
                return self._poll()
            except sqlite3.Error:
                self.close()  # opened again next time (the file may not exist yet, or was replaced)
                return []

    def _poll(self) -> list[Changed]:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, check_same_thread=False)
            self._version = None
        version: int = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return []
        first = self._version is None
        self._version = version
        if first:  # where the log is now; what came before was read from the database directly
            self._last = self._db.execute("SELECT coalesce(max(seq), 0) FROM change_log").fetchone()[0]
            return []
        rows = self._db.execute(
            "SELECT seq, subject, object_id FROM change_log WHERE seq > ? ORDER BY seq", (self._last,)
        ).fetchall()
        if not rows:
            return []
        # A gap before the first row: rows were pruned unread; every cache must start over.
        oldest_kept = self._db.execute("SELECT coalesce(min(seq), 0) FROM change_log").fetchone()[0]
        events: list[Changed] = [Changed(Subject.ALL, "")] if oldest_kept > self._last + 1 else []
        for seq, subject, object_id in rows:
            if seq in self._own:
                self._own.discard(seq)
                continue
            try:
                events.append(Changed(Subject(subject), object_id))
            except ValueError:
                events.append(Changed(Subject.ALL, ""))  # a subject this version does not know
        self._last = rows[-1][0]
        self._own = {s for s in self._own if s > self._last}
        return events

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
