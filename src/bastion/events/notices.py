"""Carries upstream change notices between replicas with PostgreSQL NOTIFY, so an agent hears what any replica's
upstream session heard.

A notice one of this process's upstream sessions heard is queued (the session's message handler never waits)
and sent on :data:`NOTICES_CHANNEL` by a background task, in a transaction of its own on the store's engine.
Every replica's listening connection (``events/pg.py``) hands the payloads to :meth:`NoticeRelay.hear`: another
replica's notice is published to the local listeners marked ``relayed``, so it is never sent again; this
process's own, which PostgreSQL delivers to its listening connection too, is recognised by the replica id and
ignored. Best effort, like the rest of list_changed: a notice that cannot be sent is logged and dropped.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Final

import anyio
import sqlalchemy as sa
from anyio.streams.memory import MemoryObjectSendStream
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.types import json_object
from bastion.upstream.notifications import Notice, UpstreamNotices

logger = logging.getLogger("bastion.events.notices")
NOTICES_CHANNEL: Final = "bastion_notices"
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (its default build). Payloads are ASCII (JSON with
# escapes), so characters are bytes.
MAX_PAYLOAD_BYTES: Final = 7999
MAX_PENDING_NOTICES: Final = 1024  # queued for sending; beyond it a notice is dropped with a warning
MAX_BATCH_NOTICES: Final = 64  # sent together in one transaction when a burst has queued them
NOTIFY_TIMEOUT_S: Final = 10.0  # one batch's transaction, connecting included

_KINDS: Final[dict[str, ServerEvent]] = {
    "tools": ToolsListChanged(),
    "prompts": PromptsListChanged(),
    "resources": ResourcesListChanged(),
}
_KIND_OF: Final = {type(event): kind for kind, event in _KINDS.items()}
_UPDATED: Final = "updated"  # resources/updated, with its URI


def encode(replica_id: str, notice: Notice) -> str | None:
    """The NOTIFY payload for ``notice`` sent by ``replica_id``; None when it would not fit (a very long URI)."""
    body: dict[str, str | None] = {
        "replica": replica_id,
        "server": notice.server_id,
        "identity": notice.identity_id,
        "event": _KIND_OF.get(type(notice.event), _UPDATED),
    }
    if isinstance(notice.event, ResourceUpdated):
        body["uri"] = notice.event.uri
    payload = json.dumps(body, separators=(",", ":"))  # ensure_ascii: one byte per character
    return payload if len(payload) <= MAX_PAYLOAD_BYTES else None


def decode(payload: str) -> tuple[str, Notice] | None:
    """(the sending replica's id, its notice marked relayed), or None for a payload that is not one."""
    fields = json_object(payload)
    if fields is None:
        return None
    replica, server, identity, kind, uri = (
        fields.get(key) for key in ("replica", "server", "identity", "event", "uri")
    )
    if not (isinstance(replica, str) and isinstance(server, str) and (identity is None or isinstance(identity, str))):
        return None
    if kind == _UPDATED:
        event = ResourceUpdated(uri=uri) if isinstance(uri, str) else None
    else:
        event = _KINDS.get(kind) if isinstance(kind, str) else None
    if event is None:
        return None
    return replica, Notice(server, identity, event, relayed=True)


class NoticeRelay:
    """This replica's end of the channel: ``run`` sends what local upstream sessions hear; ``hear`` takes the rest."""

    def __init__(self, engine: AsyncEngine, notices: UpstreamNotices, *, replica_id: str | None = None) -> None:
        self._engine = engine
        self._notices = notices
        # Random per process: a restarted replica is a new sender, and no configuration can make two alike.
        self.replica_id = replica_id or secrets.token_hex(8)
        self._send: MemoryObjectSendStream[str] | None = None

    def __repr__(self) -> str:
        return f"NoticeRelay(replica_id={self.replica_id!r}, sending={self._send is not None})"

    async def run(self, *, ready: anyio.Event | None = None) -> None:
        """Send this process's notices to the other replicas until cancelled."""
        send, receive = anyio.create_memory_object_stream[str](MAX_PENDING_NOTICES)
        self._send = send
        unsubscribe = self._notices.subscribe(self._queue)
        try:
            if ready is not None:
                ready.set()
            async for payload in receive:
                batch = [payload]
                while len(batch) < MAX_BATCH_NOTICES:
                    try:
                        batch.append(receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._notify(batch)
        finally:
            self._send = None
            unsubscribe()
            send.close()
            receive.close()

    def hear(self, payload: str) -> None:
        """A payload from the channel: another replica's notice is told to this process's listeners."""
        decoded = decode(payload)
        if decoded is None:
            logger.warning("ignored a malformed upstream notice on %s", NOTICES_CHANNEL)
            return
        sender, notice = decoded
        if sender != self.replica_id:
            self._notices.publish(notice)

    def _queue(self, notice: Notice) -> None:
        if notice.relayed or self._send is None:
            return  # another replica's, already heard everywhere; or not running
        payload = encode(self.replica_id, notice)
        if payload is None:
            # Only a resources/updated URI can be this long; a list change in its place would tell everyone
            # something else changed, so the other replicas' subscribers miss this one instead.
            logger.warning(
                "an upstream resources/updated is too large for NOTIFY; other replicas' agents will not hear it",
                extra={"server_id": notice.server_id},
            )
            return
        try:
            self._send.send_nowait(payload)
        except anyio.WouldBlock:
            logger.warning(
                "upstream notice relay backlog full; dropped one notice", extra={"server_id": notice.server_id}
            )

    async def _notify(self, batch: list[str]) -> None:
        # Shielded, so a shutdown never leaves a pooled connection half-begun; bounded, so it never waits long.
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + NOTIFY_TIMEOUT_S) as scope:
            try:
                async with self._engine.begin() as conn:
                    for payload in batch:
                        await conn.execute(sa.select(sa.func.pg_notify(NOTICES_CHANNEL, payload)))
            except (SQLAlchemyError, OSError) as exc:
                logger.warning(
                    "could not send upstream notices to the other replicas; dropped them",
                    extra={"count": len(batch), "error": type(exc).__name__},
                )
        if scope.cancelled_caught:
            logger.warning(
                "could not send upstream notices to the other replicas in time; dropped them",
                extra={"count": len(batch), "timeout_s": NOTIFY_TIMEOUT_S},
            )
