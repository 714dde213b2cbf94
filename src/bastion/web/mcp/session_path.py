"""The web side of the handshake-era relay: which requests on a live session may take it, and cancellations.

A handshake-era caller's `tools/call` on a session the registry knows (``Handshakes``), well formed as the SDK's
transport requires, whose caller declared no sampling, elicitation or roots, routed to a handshake-era Streamable
HTTP upstream whose pooled session is open, is handed to the pipeline's handshake relay
(``pipeline/handshake.py``). Everything else, and the first call of an identity (which opens the upstream
session), takes the full path.
"""

from __future__ import annotations

from typing import Any, Final, cast

from starlette.types import Scope, Send

from bastion.domain.connections import Principal
from bastion.domain.models import ProtocolEra, Transport
from bastion.errors import BastionError
from bastion.pipeline.handshake import CallRequest, HandshakeCall, HandshakeRelay
from bastion.services.directory import Mounted
from bastion.types import json_object
from bastion.upstream.relay import HANDSHAKE_VERSIONS, NO_PROFILE
from bastion.web.mcp.fastpath import FastPath
from bastion.web.mcp.sessions import SESSION_HEADER, Handshake, Handshakes

_SESSION: Final = SESSION_HEADER.encode("ascii")


class HandshakePath:
    def __init__(self, fast: FastPath, relay: HandshakeRelay, sessions: Handshakes) -> None:
        self.fast = fast
        self._relay = relay
        self._sessions = sessions

    def eligible(self, scope: Scope) -> bool:
        """A POST on a handshake-era session, while any session is known (reading the body is then worth it)."""
        if scope["method"] != "POST" or not len(self._sessions):
            return False
        names = [name for name, _ in scope["headers"]]
        return _SESSION in names and b"mcp-method" not in names

    async def handle(self, scope: Scope, body: bytes, send: Send, principal: Principal) -> bool:
        """Serve the message and return True, or return False (nothing sent) for the full path to take it."""
        headers = dict(scope["headers"])
        session = self._sessions.find(headers[_SESSION].decode("latin-1"), principal)
        if session is None or not _well_formed(headers):
            return False
        message = json_object(body)
        if message is None:
            return False  # the full path answers it with the JSON-RPC parse error
        if message.get("method") == "notifications/cancelled":
            return await self._cancel(scope, session, message, send)
        request = CallRequest.of(message)
        if request is None or session.profile != NO_PROFILE:
            return False  # malformed (the SDK answers it) or a caller the upstream may ask things of
        routed = await self.fast.admission.route(principal, request.name)
        if routed is None or not _handshake_server(routed[0]):
            return False
        mounted, tool = routed
        try:
            proxy = self.fast.admission.proxy
            identity_id = proxy.identity_for(principal, mounted)
            lease = self.fast.admission.pool.cached_lease(
                mounted.server, identity_id, NO_PROFILE, await proxy.generation(principal, identity_id)
            )
        except BastionError:
            return False  # the full path answers it (enrolment needed, or the identity cannot be renewed)
        if lease is None or lease.protocol_version not in HANDSHAKE_VERSIONS:
            return False  # the full path opens the upstream session (and learns its era)
        if await self.fast.rejected(scope, send):
            return True
        self._sessions.touch(session.session_id, mounted.server.call_timeout_s)
        await HandshakeCall(self._relay, principal, mounted, session, send, request, identity_id).run(tool, lease)
        self._sessions.touch(session.session_id)
        return True

    async def _cancel(self, scope: Scope, session: Handshake, message: dict[str, Any], send: Send) -> bool:
        params: Any = message.get("params")
        request_id = cast("dict[str, Any]", params).get("requestId") if isinstance(params, dict) else None
        call = session.calls.get(session.call_key(request_id)) if request_id is not None else None
        if call is None:
            return False  # not a call of the hot path: the SDK's session cancels its own
        if await self.fast.rejected(scope, send):
            return True
        call.cancel()
        await send({"type": "http.response.start", "status": 202, "headers": [(_SESSION, session.session_id.encode())]})
        await send({"type": "http.response.body", "body": b""})
        return True


def _well_formed(headers: dict[bytes, bytes]) -> bool:
    """What the SDK's transport checks of a POST (else it answers 406/415/400 itself)."""
    accept = headers.get(b"accept", b"").lower()
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
    return (
        b"application/json" in accept
        and b"text/event-stream" in accept
        and content_type == b"application/json"
        and version in HANDSHAKE_VERSIONS
    )


def _handshake_server(mounted: Mounted) -> bool:
    server = mounted.server
    return server.transport is Transport.STREAMABLE_HTTP and server.era is not ProtocolEra.MODERN
