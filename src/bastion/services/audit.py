"""The audit log's write path: one event per MCP request, durable before anything is forwarded (fail closed).

A request's event is written as a pending row before the first upstream call (the caller waits for that
commit), and sealed into the hash chain with its outcome afterwards (the caller does not wait). Writes are
grouped: whatever is queued while one transaction commits goes into the next one, so under load many
events share a commit. Refusals at the door and admin actions have no upstream call: they are sealed directly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import anyio
import anyio.lowlevel
import sqlalchemy as sa
from anyio.abc import TaskGroup
from sqlalchemy.exc import DataError, IntegrityError

from bastion.context import request_id_var
from bastion.db import audit as rows
from bastion.db.audit import ChainKeys
from bastion.db.store import Store
from bastion.domain.audit import AuditEvent, arguments_hmac, derive_key, preview
from bastion.domain.connections import Principal
from bastion.domain.ids import new_id
from bastion.errors import BastionError
from bastion.services.principals import Refused
from bastion.summaries import Tally
from bastion.types import JSONValue

logger = logging.getLogger("bastion.audit")

MAX_BATCH: Final = 500  # events per grouped commit
INLINE_MAX: Final = 32  # events a commit may write on the event loop (SQLite); a bigger one goes to a thread
# Seals and refusals wait this long for a request's pending write to carry them in the same commit; under load
# they always find one, and an idle gateway writes them on their own after the delay.
SEAL_DELAY_S: Final = 0.05
RETRY_DELAY_S: Final = 1.0  # after a failed grouped commit of events already decided (seals, refusals)
RECOVER_EVERY_S: Final = 60.0
OPEN_TIMEOUT_S: Final = 10.0  # longest a request waits for its event to be durable before it is refused
FLUSH_TIMEOUT_S: Final = 30.0
MAX_QUEUED: Final = 100_000  # seals and refusals kept in memory while the database is down, at most

_current: ContextVar[tuple[Audit, CallRecord] | None] = ContextVar("bastion_audit_call", default=None)


class AuditUnavailable(BastionError):
    code = "audit_unavailable"
    status = 503
    title = "Audit log unavailable"


@dataclass(frozen=True, slots=True)
class AuditKeys:
    chain: bytes
    checkpoint: bytes
    arguments: bytes
    content: bytes  # the content rules' "hash" action

    def __repr__(self) -> str:
        return "AuditKeys(…)"

    @classmethod
    def from_secret(cls, audit_key: bytes) -> AuditKeys:
        return cls(
            derive_key(audit_key, "chain"),
            derive_key(audit_key, "checkpoint"),
            derive_key(audit_key, "arguments"),
            derive_key(audit_key, "content"),
        )

    def chain_keys(self, checkpoint_every: int = 1000) -> ChainKeys:
        return ChainKeys(self.chain, self.checkpoint, checkpoint_every)


@dataclass(slots=True)
class CallRecord:
    """One MCP request as it happens; the proxy fills in what only routing knows (server, decision, findings)."""

    method: str
    gateway: str
    principal: Principal | None
    name: str | None = None
    server: str | None = None
    arguments: JSONValue = None  # as the caller sent them: only an HMAC and a redacted preview are kept
    shown_arguments: JSONValue = None  # after content rules: what the preview is made from, when set
    decision: str | None = None
    outcome: str = "ok"
    reason: str | None = None
    upstream_status: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    id: str = field(default_factory=new_id)
    correlation_id: str | None = field(default_factory=request_id_var.get)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    opened: bool = False
    # The arguments' HMAC and preview, made once: the pending and the sealed event carry the same ones.
    digested: tuple[str | None, str | None] | None = None
    who: Refused | None = None  # for a refused token: whom it speaks for, when that is known

    def failed(self, reason: str) -> None:
        """The request ended in an error for ``reason``, unless a refusal (denied, limited) already says why."""
        if self.outcome == "ok":
            self.outcome, self.reason = "error", reason


@dataclass(slots=True)
class _Batch:
    pending: list[AuditEvent] = field(default_factory=list[AuditEvent])
    finished: list[AuditEvent] = field(default_factory=list[AuditEvent])
    new: list[AuditEvent] = field(default_factory=list[AuditEvent])
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.pending) + len(self.finished) + len(self.new)


class Audit:
    """Group-commits audit events. ``running()`` drains seals in the background and flushes on the way out."""

    def __init__(
        self,
        store: Store,
        keys: AuditKeys,
        *,
        checkpoint_every: int = 1000,
        stale_after_s: float = 7500.0,
        open_timeout_s: float = OPEN_TIMEOUT_S,
        enabled: bool = True,
    ) -> None:
        self._store = store
        self._enabled = enabled
        self._keys = keys
        self._chain = keys.chain_keys(checkpoint_every)
        self._stale_after = timedelta(seconds=stale_after_s)
        self._open_timeout = open_timeout_s
        self._batch = _Batch()
        self._lock = anyio.Lock(fast_acquire=True)  # no trip through the event loop when it is free
        self._tg: TaskGroup | None = None
        self._draining = False
        self._wake = anyio.Event()  # set when seals should be written at once rather than after the delay
        self._failures = Tally(logger, "audit writes failed", level=logging.ERROR)

    # --- building events ------------------------------------------------------------------------------------------

    def event(self, record: CallRecord, *, outcome: str | None = None) -> AuditEvent:
        principal = record.principal
        finished = outcome != "pending"
        if record.digested is None:
            shown = record.shown_arguments if record.shown_arguments is not None else record.arguments
            record.digested = (
                arguments_hmac(self._keys.arguments, record.arguments) if record.arguments is not None else None,
                preview(shown) if shown is not None else None,
            )
        who = principal or record.who
        return AuditEvent(
            id=record.id,
            occurred_at=record.started_at,
            kind="mcp",
            method=record.method,
            outcome=outcome or record.outcome,
            workspace=who.workspace_id if who else None,
            correlation_id=record.correlation_id,
            member_id=who.member_id if who else None,
            actor=who.member_email if who else None,
            host_id=who.host_id if who else None,
            token_id=who.token_id if who else None,
            gateway=record.gateway or None,
            server=record.server,
            name=record.name,
            decision=record.decision,
            reason=record.reason,
            upstream_status=record.upstream_status if finished else None,
            latency_us=int((time.perf_counter() - record.started) * 1_000_000) if finished else None,
            args_hmac=record.digested[0],
            args_preview=record.digested[1],
            detail={"content": list(record.findings)} if record.findings else None,
        )

    # --- the request path -----------------------------------------------------------------------------------------

    @asynccontextmanager
    async def call(self, record: CallRecord) -> AsyncGenerator[CallRecord, None]:
        """Around one MCP request: exactly one event, whatever happens inside."""
        token = _current.set((self, record))
        try:
            yield record
        except BaseException as exc:
            # The error's reason replaces the policy decision's (an allowed call that failed says why it failed).
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            record.failed("cancelled" if cancelled else getattr(exc, "code", None) or type(exc).__name__)
            raise
        finally:
            _current.reset(token)
            if self._enabled:
                self._enqueue(self.event(record), finished=record.opened)

    async def refused(self, record: CallRecord) -> None:
        """A request turned away at the door (bad token, disabled host …): written down all the same."""
        if self._enabled:
            self._enqueue(self.event(record), finished=False)

    async def open(self, record: CallRecord) -> None:
        """Make the request's event durable before anything is forwarded.

        Its commit carries pending rows only (and those of requests opening meanwhile): earlier calls' seals are
        the drain's, which this wakes to write them while the request is out at its upstream.

        Raises:
            AuditUnavailable: the event could not be written; nothing may be forwarded.
        """
        if record.opened or not self._enabled:
            return
        batch = self._batch
        batch.pending.append(self.event(record, outcome="pending"))
        try:
            # A stalled database must not hold the caller: it is refused (the write, if it lands later, is
            # completed by the request's outcome all the same, by event id).
            with anyio.fail_after(self._open_timeout):
                await self._commit(batch, seals=False)
        except BaseException as exc:
            # Refused, timed out or cancelled (the caller hung up): a row not written yet never will be, or the
            # drain could seal the request's outcome first and this late pending row then clash with it.
            batch.pending[:] = [e for e in batch.pending if e.id != record.id]
            if isinstance(exc, TimeoutError):
                raise AuditUnavailable("the audit log did not answer in time; nothing was forwarded") from exc
            raise
        record.opened = True
        if self._decided():
            self._schedule_drain(now=True)

    async def settle(self) -> None:
        """Seal what this process has decided so far, now (one attempt): a reader sees the calls it just made.

        Through the lock even when nothing is queued: a seal already on its way (taken out of the queue, not yet
        committed) is waited for too."""
        if not self._enabled:
            return
        with contextlib.suppress(AuditUnavailable):
            await self._seal()
            while self._decided():  # more than a batch's worth
                await self._seal()

    # --- grouped commits ------------------------------------------------------------------------------------------

    def _decided(self) -> bool:
        return bool(self._batch.finished or self._batch.new)

    def _enqueue(self, event: AuditEvent, *, finished: bool) -> None:
        if not self._enabled:
            return
        batch = self._batch
        if len(batch) >= MAX_QUEUED:
            logger.error("audit queue full: an event was dropped", extra={"audit_id": event.id})
            return
        (batch.finished if finished else batch.new).append(event)
        self._schedule_drain(now=False)

    def _schedule_drain(self, *, now: bool) -> None:
        """Seal decided events in the background: ``now``, or after the delay that lets a lull's seals group."""
        if now:
            self._wake.set()
        if self._tg is not None and not self._draining:
            self._draining = True
            self._tg.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            if not self._wake.is_set():
                with anyio.move_on_after(SEAL_DELAY_S):
                    await self._wake.wait()
            self._wake = anyio.Event()
            # Until nothing decided is left (more may be decided meanwhile): no flag reset can slip in between.
            while self._decided():
                try:
                    await self._seal()
                except AuditUnavailable:
                    await anyio.sleep(RETRY_DELAY_S)
                await anyio.lowlevel.checkpoint()  # a backlog's batches must not hold the event loop end to end
        finally:
            self._draining = False

    async def _seal(self) -> None:
        """Commit the decided events queued so far (a batch's worth), leaving pending rows to their requests.

        It takes whatever is queued once it holds the lock, so requests committing before it (under steady load,
        always some) cannot leave it with nothing while seals wait for a lull.
        """
        async with self._lock:
            queued = self._batch
            sealing = _Batch()
            sealing.finished, queued.finished = queued.finished[:MAX_BATCH], queued.finished[MAX_BATCH:]
            keep = max(MAX_BATCH - len(sealing.finished), 0)
            sealing.new, queued.new = queued.new[:keep], queued.new[keep:]
            if len(sealing):
                await self._write_batch(sealing)

    async def _commit(self, batch: _Batch, *, seals: bool = True) -> None:
        """Commit ``batch`` (and whatever joined it), or wait for the commit that carries it.

        Without ``seals``, only its pending rows: its decided events move to the next batch, for the drain.
        """
        async with self._lock:
            if batch.done.is_set():
                if batch.error is not None:
                    raise AuditUnavailable("the audit log cannot be written; nothing was forwarded") from batch.error
                return
            self._batch = _Batch()
            if seals:
                # Decided events beyond one batch's worth (a backlog after an outage) wait for the next commit.
                keep = max(MAX_BATCH - len(batch.finished), 0)
                self._batch.finished, batch.finished = batch.finished[MAX_BATCH:], batch.finished[:MAX_BATCH]
                self._batch.new, batch.new = batch.new[keep:], batch.new[:keep]
            else:
                self._batch.finished, batch.finished = batch.finished, []
                self._batch.new, batch.new = batch.new, []
            await self._write_batch(batch)

    async def _write_batch(self, batch: _Batch) -> None:
        """Write ``batch`` (the lock held) and mark it done; on failure its decided events are queued again."""
        try:
            with anyio.CancelScope(shield=True):
                await self._store.journal(lambda journal: self._write(journal, batch), inline=len(batch) <= INLINE_MAX)
        except Exception as exc:
            # During an outage every batch fails: one line (with its traceback) a minute, not one per call.
            self._failures.note(type(exc).__name__, error=exc)
            batch.error = exc
            # Decided events (seals, refusals) are kept for the next commit; pending ones fail their callers.
            # When the database is up but refused the data, they are kept in a reduced form that any
            # database stores, so one unstorable event cannot block every later one.
            carry: Callable[[AuditEvent], AuditEvent] = _reduced if _refused_data(exc) else _same
            self._batch.finished.extend(carry(e) for e in batch.finished)
            self._batch.new.extend(carry(e) for e in batch.new)
            batch.done.set()
            raise AuditUnavailable("the audit log cannot be written; nothing was forwarded") from exc
        batch.done.set()

    def _write(self, journal: rows.Journal, batch: _Batch) -> None:
        rows.write_pending(journal, self._chain, batch.pending)
        rows.append(journal, self._chain, new=batch.new, finished=batch.finished)

    async def flush(self) -> None:
        """Until everything queued so far is committed (retrying while the database is away)."""
        while True:
            async with self._lock:  # a write on its way (the drain's) ends first: what it fails is queued again
                pass
            if not len(self._batch):
                return
            try:
                await self._commit(self._batch)
            except AuditUnavailable:
                await anyio.sleep(RETRY_DELAY_S)

    async def recover(self, now: datetime | None = None) -> int:
        """Seal pending events older than the longest call could take: their process died mid-call."""
        before = (now or datetime.now(UTC)) - self._stale_after
        total = 0
        while sealed := await self._store.write(lambda conn: self._recover_batch(conn, before)):
            total += sealed
            logger.warning("sealed interrupted audit events", extra={"events": sealed})
        return total

    def _recover_batch(self, conn: sa.Connection, before: datetime) -> int:
        stale = rows.stale_pending(conn, self._chain, before, MAX_BATCH)
        if not all(intact for _e, intact in stale):
            logger.error("pending audit rows failed their MAC; sealed as tampered")
        interrupted = [
            replace(e, outcome="interrupted", reason="the gateway stopped before the call's outcome was known")
            if intact
            else replace(e, outcome="tampered", reason="this pending row was altered or forged in the database")
            for e, intact in stale
        ]
        with rows.Journal.on(conn) as journal:
            rows.append(journal, self._chain, finished=interrupted)
        return len(stale)

    @asynccontextmanager
    async def running(self) -> AsyncGenerator[None]:
        """Background draining and recovery while serving; on exit, everything queued is flushed."""
        if self._enabled:
            await self._recover_once()  # before serving: events a killed process left pending are sealed first
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self._enabled:
                tg.start_soon(self._recover_periodically)
            try:
                yield
            finally:
                self._tg = None
                with anyio.CancelScope(shield=True), anyio.move_on_after(FLUSH_TIMEOUT_S):
                    await self.flush()
                if len(self._batch):
                    logger.error("audit events not written at shutdown", extra={"events": len(self._batch)})
                tg.cancel_scope.cancel()

    async def _recover_once(self) -> None:
        try:
            await self.recover()
        except BastionError:
            logger.warning("audit recovery postponed: the database is unavailable")
        except Exception:  # a background sweep: log and retry later rather than end the process
            logger.exception("audit recovery failed; it is retried later")

    async def _recover_periodically(self) -> None:
        while True:
            await anyio.sleep(RECOVER_EVERY_S)
            await self._recover_once()


def _same(event: AuditEvent) -> AuditEvent:
    return event


def _refused_data(error: BaseException) -> bool:
    """The database answered but would not store these values (as opposed to being unreachable)."""
    return isinstance(error, DataError | IntegrityError | UnicodeError | ValueError)


def _reduced(event: AuditEvent) -> AuditEvent:
    """What is certain about an event whose values the database refused: who, when, what kind, and that."""
    return replace(
        event,
        name=None,
        target=None,
        reason="the event's values could not be stored as sent",
        args_preview=None,
        detail=None,
        gateway=event.gateway.encode("ascii", "replace").decode("ascii").replace("\x00", "?")
        if event.gateway
        else None,
    )


def current_record() -> CallRecord | None:
    """The request being served, for the proxy to note what only routing knows."""
    current = _current.get()
    return current[1] if current is not None else None


async def before_forwarding() -> None:
    """Called before anything is sent upstream for the current request: its event must be durable first.

    Raises:
        AuditUnavailable: it could not be written, so nothing may be forwarded (fail closed).
    """
    current = _current.get()
    if current is not None:
        log, record = current
        await log.open(record)
