"""Handshake-era downstream sessions the hot path may serve: whose each is, and what its caller declared.

A session joins once its caller sent `notifications/initialized` (the handshake is complete) and leaves
when the SDK ends it (DELETE, idle timeout, shutdown). The SDK's session manager stays the authority on
whether a session is alive: an entry whose session the manager no longer holds is never served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from mcp.server import ServerRequestContext
from mcp.server.connection import Connection
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from bastion.domain.connections import Principal
from bastion.upstream.relay import HANDSHAKE_VERSIONS, Profile

SESSION_HEADER: Final = "mcp-session-id"


@dataclass(slots=True, eq=False)
class Handshake:
    """One live session: the token that opened it and what its caller declared at initialize."""

    session_id: str
    token_id: str
    protocol_version: str
    profile: Profile
    # Calls the hot path is forwarding, by the caller's request id (as JSON): `notifications/cancelled` ends them.
    calls: dict[str, anyio.CancelScope] = field(default_factory=dict[str, anyio.CancelScope])

    def call_key(self, request_id: Any) -> str:
        return json.dumps(request_id)

    def end(self) -> None:
        """The session ended (DELETE, idle timeout, shutdown): so do its calls, as the SDK ends its own."""
        for call in list(self.calls.values()):
            call.cancel()


class Handshakes:
    """Session id → `Handshake`, for sessions of the SDK manager set with ``bind``."""

    def __init__(self) -> None:
        self._sessions: dict[str, Handshake] = {}
        self._manager: StreamableHTTPSessionManager | None = None

    def __repr__(self) -> str:
        return f"Handshakes(live={len(self._sessions)})"

    def __len__(self) -> int:
        return len(self._sessions)

    def bind(self, manager: StreamableHTTPSessionManager) -> None:
        self._manager = manager

    def join(self, ctx: ServerRequestContext[Any, Any], principal: Principal | None) -> None:
        """Record the session of ``ctx`` (a handshake-era `notifications/initialized`) until it ends."""
        request = ctx.request
        headers = getattr(request, "headers", None)
        session_id = headers.get(SESSION_HEADER) if headers is not None else None
        if principal is None or not session_id or ctx.protocol_version not in HANDSHAKE_VERSIONS:
            return
        # As `listeners.join`: the connection's exit stack is the one hook that runs when the session ends.
        connection = getattr(ctx.session, "_connection", None)
        if not isinstance(connection, Connection) or session_id in self._sessions:
            return
        profile = Profile.of(ctx.session.client_capabilities)
        entry = self._sessions[session_id] = Handshake(session_id, principal.token_id, ctx.protocol_version, profile)
        connection.exit_stack.callback(entry.end)
        connection.exit_stack.callback(self._sessions.pop, session_id, None)

    def find(self, session_id: str, principal: Principal) -> Handshake | None:
        """The live session ``session_id`` if ``principal``'s token opened it (else the SDK answers for it)."""
        entry = self._sessions.get(session_id)
        if entry is None or entry.token_id != principal.token_id or self._transport(session_id) is None:
            return None
        return entry

    def token_ids(self) -> set[str]:
        return {entry.token_id for entry in self._sessions.values()}

    async def end(self, token_ids: Collection[str]) -> int:
        """End the sessions opened with ``token_ids`` (a change refused them): their calls and streams end, and
        their session id is answered 404 from now on. How many were ended."""
        ended = [entry for entry in self._sessions.values() if entry.token_id in token_ids]
        for entry in ended:
            entry.end()
            transport = self._transport(entry.session_id)
            if transport is not None:
                await transport.terminate()
        return len(ended)

    def touch(self, session_id: str, busy_s: float = 0.0) -> None:
        """A call on the session starts (lasting up to ``busy_s``) or ended: its idle timeout counts from then.

        The SDK counts only requests it serves itself; one of its own ending meanwhile sets the timeout from
        its end (a hot-path call longer than the idle timeout could then see the session end under it).
        """
        transport = self._transport(session_id)
        timeout = self._manager.session_idle_timeout if self._manager is not None else None
        if transport is None or timeout is None or transport.idle_scope is None:
            return
        scope = transport.idle_scope
        if not math.isinf(scope.deadline):  # infinite: the SDK is serving a request of its own on it
            scope.deadline = max(scope.deadline, anyio.current_time() + timeout + busy_s)

    def _transport(self, session_id: str) -> Any:
        if self._manager is None:
            return None
        transport = self._manager._server_instances.get(session_id)  # pyright: ignore[reportPrivateUsage]
        return None if transport is None or transport.is_terminated else transport
