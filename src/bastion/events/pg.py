"""Carries change events between replicas with PostgreSQL LISTEN/NOTIFY.

Each process keeps one listening connection. A NOTIFY is sent inside the transaction that made the change
(see ``Store.transaction``), so listeners hear only committed changes. After a lost connection the
listener publishes a ``Subject.ALL`` reset, because events may have been missed meanwhile, and until it is back
no cache keeps anything (``EventBus.live``). The same
connection hears upstream change notices (``events/notices.py``) when given a ``notices`` handler; the reset
covers those missed too (agents are told every list changed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import anyio
from sqlalchemy.engine import make_url

from bastion.events.bus import CHANGES_CHANNEL, Changed, EventBus, Subject
from bastion.events.notices import NOTICES_CHANNEL
from bastion.events.replicas import SYNC_PREFIX, Replica

logger = logging.getLogger("bastion.events.pg")
RECONNECT_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
CONNECT_TIMEOUT_S: Final = 5


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def listen(
    database_url: str,
    bus: EventBus,
    *,
    ready: anyio.Event | None = None,
    notices: Callable[[str], None] | None = None,
    replica: Replica | None = None,
) -> None:
    """Relay change NOTIFYs to ``bus`` (and upstream notices' payloads to ``notices``) until cancelled, reconnecting
    with backoff. While it is not connected ``bus.live`` is false: caches keep nothing, so nothing can be missed.
    With ``replica``, this process is a live replica while connected and answers each change's nonce once it has
    published that change (events/replicas.py)."""
    import psycopg  # only replicas on PostgreSQL pay for the driver

    attempt = 0
    while True:
        try:
            # Connecting is shielded (and bounded): a shutdown landing mid-connect would otherwise leave psycopg's
            # half-made connection open, for the garbage collector to find.
            connected: psycopg.AsyncConnection[tuple[object, ...]] | None = None
            with anyio.CancelScope(shield=True):
                connected = await psycopg.AsyncConnection.connect(
                    conninfo(database_url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                )
            if connected is None:
                continue  # only a cancelled scope ends without it, and this one is shielded
            conn = connected
            try:
                await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                if notices is not None:
                    await conn.execute(f"LISTEN {NOTICES_CHANNEL}")
                if replica is not None:
                    await replica.beat()  # live before caching: a change from now on waits for this replica
                bus.live = True
                if attempt:
                    bus.publish(Changed(Subject.ALL, "*"))
                attempt = 0
                if ready is not None:
                    ready.set()
                async for notify in conn.notifies():
                    if notify.channel == NOTICES_CHANNEL and notices is not None:
                        notices(notify.payload)
                        continue
                    if notify.payload.startswith(SYNC_PREFIX):
                        if replica is not None:
                            replica.heard(notify.payload.removeprefix(SYNC_PREFIX))
                        continue
                    event = Changed.decode(notify.payload)
                    if event is not None:
                        bus.publish(event)
            finally:
                with anyio.CancelScope(shield=True):  # closed even when cancelled (a shutdown), never left to the GC
                    await conn.close()
        except Exception as exc:  # noqa: BLE001  the listener must outlive any failure: it only invalidates caches
            if bus.live:
                bus.live = False  # changes may be missed from now until connected again: forget, keep nothing
                bus.publish(Changed(Subject.ALL, "*"))
            delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
            attempt += 1
            logger.warning(
                "change listener lost its connection; reconnecting",
                extra={"error": type(exc).__name__, "retry_in_s": delay},
            )
            await anyio.sleep(delay)
