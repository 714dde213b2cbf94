"""Ends what is already open for a token once a change refuses it: listen streams and handshake-era sessions.

Requests are checked as they come (``services/principals.Resolver``); a stream already open is not a request.
After each change that can narrow access (a host, connection, member, gateway or token; a reset) the sentinel
reads, in one query, whether each token that holds something open would still be admitted, and ends what the
refused ones hold: a `subscriptions/listen` stream answers its JSON-RPC error (``ACCESS_ENDED``, saying why), a
handshake-era session is terminated (its GET stream closes; its id is answered 404 from then on). A sweep also
runs every ``SWEEP_S``, for tokens that expire while their streams stay open.
"""

from __future__ import annotations

import logging
from typing import Final

import anyio

from bastion.errors import BastionError
from bastion.events.bus import Changed, EventBus, Subject
from bastion.services.principals import Resolver
from bastion.web.mcp.listeners import Listeners
from bastion.web.mcp.sessions import Handshakes

logger = logging.getLogger("bastion.mcp")
SWEEP_S: Final = 30.0
NARROWING: Final = frozenset(
    {Subject.HOST, Subject.CONNECTION, Subject.MEMBER, Subject.GATEWAY, Subject.TOKEN, Subject.ALL}
)


class Sentinel:
    def __init__(self, resolver: Resolver, bus: EventBus, listeners: Listeners, handshakes: Handshakes | None) -> None:
        self._resolver = resolver
        self._bus = bus
        self._listeners = listeners
        self._handshakes = handshakes
        self._due = anyio.Event()

    def __repr__(self) -> str:
        return f"Sentinel(due={self._due.is_set()})"

    def _on_change(self, event: Changed) -> None:
        if event.subject in NARROWING:
            self._due.set()

    async def run(self) -> None:
        """Sweep after each narrowing change (and every ``SWEEP_S``) until cancelled."""
        unsubscribe = self._bus.subscribe(self._on_change)
        try:
            while True:
                with anyio.move_on_after(SWEEP_S):
                    await self._due.wait()
                self._due = anyio.Event()  # a change during the sweep calls for another one
                try:
                    await self.sweep()
                except Exception:
                    logger.exception("could not check the open streams against a change")
                    await anyio.sleep(1)  # the database may be away: try again, not in a tight loop
                    self._due.set()
        finally:
            unsubscribe()

    async def sweep(self) -> dict[str, BastionError]:
        """End what refused tokens hold open; the refusals, by token id."""
        holding = self._listeners.token_ids()
        if self._handshakes is not None:
            holding |= self._handshakes.token_ids()
        if not holding:
            return {}
        refused = await self._resolver.refusals(holding)
        if refused:
            streams = self._listeners.end(refused)
            sessions = await self._handshakes.end(refused.keys()) if self._handshakes is not None else 0
            logger.info(
                "ended what refused tokens held open",
                extra={"tokens": len(refused), "listen_streams": streams, "sessions": sessions},
            )
        return refused
