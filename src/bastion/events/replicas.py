"""Replicas on one PostgreSQL database confirm each change before the process that made it answers.

A change's NOTIFY reaches the other replicas a moment after its commit; until then a replica would still admit
calls from its caches (a token of a host just disabled). So a narrowing change is not over when it commits but
when every live replica has heard it:

- Each serving replica keeps a row in ``replicas`` while its change listener is connected, renewed every
  ``BEAT_S`` with the database's clock; rows older than ``LIVE_S`` are replicas that stopped or lost the
  database. A replica whose listener is down keeps no caches at all (``EventBus.live``), so it needs no word.
- The transaction that makes a change (``Store.transaction``, any process: serve, the CLI) reads the other live
  replicas. When there are any, it listens on ``ACKS_CHANNEL`` and sends ``sync:<nonce>`` after its change
  events; NOTIFYs of one transaction arrive in order, so a replica that reads the nonce has already emptied
  its caches and answers ``<nonce> <replica id>``. The transaction returns when all have answered, or after
  ``CONFIRM_TIMEOUT_S`` with a warning naming the silent ones.

The wait costs one statement per change when a process runs alone, and a round trip through PostgreSQL per
change with replicas; calls pay nothing.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Final

import anyio
import sqlalchemy as sa
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion.db.schema import replicas
from bastion.domain.ids import new_id
from bastion.events.bus import CHANGES_CHANNEL, EventBus

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("bastion.events.replicas")
ACKS_CHANNEL: Final = "bastion_acks"
SYNC_PREFIX: Final = "sync:"
BEAT_S: Final = 2.0
# Fifteen beats: a replica whose beats lag under load (a starved pool, a busy loop) is still waited for; one that
# crashed costs each change at most CONFIRM_TIMEOUT_S until its row is this old (a clean stop removes it at once).
LIVE_S: Final = 30.0
CONFIRM_TIMEOUT_S: Final = 2.0
MAX_PENDING_ACKS: Final = 1024
STATEMENT_TIMEOUT_S: Final = 5.0  # this module's own statements (a beat, a batch of answers, leaving)


async def others(conn: AsyncConnection, me: str | None) -> set[str]:
    """The live replicas other than ``me``, read on the changing transaction (PostgreSQL)."""
    query = sa.select(replicas.c.id).where(replicas.c.seen_at > sa.func.now() - sa.text(f"interval '{LIVE_S} s'"))
    if me is not None:
        query = query.where(replicas.c.id != me)
    return set((await conn.execute(query)).scalars())


class Confirmation:
    """One change's request for the other live replicas' word, and the listening connection their answers reach."""

    def __init__(self, listening: psycopg.AsyncConnection[tuple[object, ...]], waiting_for: set[str]) -> None:
        self.nonce = secrets.token_hex(8)
        self._conn = listening
        self._waiting_for = set(waiting_for)

    @classmethod
    async def ask(cls, conn: AsyncConnection, conninfo: str, me: str | None) -> Confirmation | None:
        """On the changing transaction ``conn``: listen for answers, then send the nonce after its events; None
        when no other replica is live. Close what this returns (``close``) whatever happens next."""
        import psycopg

        waiting = await others(conn, me)
        if not waiting:
            return None
        # Listening before the change commits: no answer can come before it is heard. Connecting is shielded: a
        # cancellation mid-connect would leave psycopg's half-made connection for the garbage collector.
        listening: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        with anyio.CancelScope(shield=True):
            listening = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=5)
        if listening is None:
            raise RuntimeError("unreachable: the connect above is shielded")
        confirmation = cls(listening, waiting)
        try:
            await listening.execute(f"LISTEN {ACKS_CHANNEL}")
            await conn.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, f"{SYNC_PREFIX}{confirmation.nonce}")))
        except BaseException:
            await confirmation.close()
            raise
        return confirmation

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._conn.close()

    async def wait(self) -> set[str]:
        """Wait for the answers; the replicas that did not answer in time (empty when all did)."""
        with anyio.move_on_after(CONFIRM_TIMEOUT_S):
            async for notify in self._conn.notifies():
                nonce, _, replica = notify.payload.partition(" ")
                if nonce == self.nonce:
                    self._waiting_for.discard(replica)
                if not self._waiting_for:
                    break
        if self._waiting_for:
            logger.warning(
                "a change was not confirmed by every replica in time",
                extra={"replicas": sorted(self._waiting_for), "timeout_s": CONFIRM_TIMEOUT_S},
            )
        return set(self._waiting_for)


class Replica:
    """This serving process among the replicas: its row in ``replicas`` and its answers to changes it heard."""

    def __init__(self, engine: AsyncEngine, bus: EventBus) -> None:
        self.id = new_id()
        self._engine = engine
        self._bus = bus
        send, receive = anyio.create_memory_object_stream[str](MAX_PENDING_ACKS)
        self._acks: MemoryObjectSendStream[str] = send
        self._pending: MemoryObjectReceiveStream[str] = receive

    def __repr__(self) -> str:
        return f"Replica(id={self.id!r}, live={self._bus.live})"

    async def beat(self) -> None:
        """Mark this replica live now (the database's clock). Shielded and bounded: a shutdown never lands inside a
        statement, which would strand its connection.

        Raises:
            TimeoutError: the database did not answer within ``STATEMENT_TIMEOUT_S``.
        """
        with anyio.fail_after(STATEMENT_TIMEOUT_S, shield=True):
            async with self._engine.begin() as conn:
                updated = await conn.execute(
                    replicas.update().where(replicas.c.id == self.id).values(seen_at=sa.func.now())
                )
                if updated.rowcount == 0:
                    now = sa.func.now()
                    await conn.execute(replicas.insert().values(id=self.id, started_at=now, seen_at=now))

    async def leave(self) -> None:
        with anyio.move_on_after(STATEMENT_TIMEOUT_S, shield=True):
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(replicas.delete().where(replicas.c.id == self.id))
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("could not remove this replica's row", extra={"error": type(exc).__name__})

    def heard(self, nonce: str) -> None:
        """A change's nonce read by the listener, after its events were published: answer it (never waits)."""
        try:
            self._acks.send_nowait(nonce)
        except anyio.ClosedResourceError:
            pass  # shutting down
        except anyio.WouldBlock:
            logger.warning("too many changes to confirm; one goes unanswered")

    async def run(self) -> None:
        """Answer heard changes and renew this replica's row while the listener is connected, until cancelled."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._answer)
                while True:
                    await anyio.sleep(BEAT_S)
                    if self._bus.live:
                        try:
                            await self.beat()
                        except (SQLAlchemyError, OSError, TimeoutError) as exc:
                            logger.warning("could not renew this replica's row", extra={"error": type(exc).__name__})
        finally:
            self._acks.close()
            self._pending.close()
            await self.leave()

    async def _answer(self) -> None:
        async for nonce in self._pending:
            batch = [nonce]
            while len(batch) < 64:
                try:
                    batch.append(self._pending.receive_nowait())
                except anyio.WouldBlock:
                    break
            try:
                with anyio.fail_after(STATEMENT_TIMEOUT_S, shield=True):  # as ``beat``
                    async with self._engine.begin() as conn:
                        for each in batch:
                            await conn.execute(sa.select(sa.func.pg_notify(ACKS_CHANNEL, f"{each} {self.id}")))
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                logger.warning("could not confirm a change", extra={"error": type(exc).__name__})
