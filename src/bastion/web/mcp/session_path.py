"""The handshake-era hot path: a `tools/call` on a live session, posted into the pooled upstream session.

A handshake-era (2025-11-25 and earlier) caller's `tools/call` to a handshake-era Streamable HTTP upstream is
forwarded without the SDK's session server and client, which cost most of such a call's CPU. What the full path
would decide is decided the same way (session bound to the token, Host/Origin, routing, provisioning, the
audit event before anything leaves), and the call goes into the upstream session Bastion's pool already holds
for this identity. That session is shared by every caller of the identity, so the request is rebuilt from
the call's name, arguments and `_meta`, with Bastion's own request id and progress token (``bastion-N``),
mapped back on the answer and on progress notifications. The answer is re-framed: JSON stays JSON; an event
stream's events are re-sent without upstream event ids (a caller resuming with one would reach the SDK's event
store, which never saw it), and Bastion itself resumes an upstream stream that closes before the answer. Of
the upstream's notifications on the call's stream, progress and log messages reach the caller, and change
notices go where the pooled session's would (``UpstreamNotices``). The caller's `notifications/cancelled`
for a call in flight here is answered as the SDK answers it (-32800) and passed on upstream.

Only sessions whose caller declared no sampling, elicitation or roots are served here: a request from the
upstream could otherwise need the caller, and only the full path relays those. Should the upstream ask
anything all the same (a ping), Bastion answers it as its upstream client would. Everything else, and the
first call of an identity (which opens the upstream session), takes the full path.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Final, cast

import anyio
import mcp_types as types
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)
from starlette.types import Scope, Send

from bastion.domain.connections import Principal
from bastion.domain.models import ProtocolEra, Transport
from bastion.errors import BastionError
from bastion.net.outbound import UrlRefused
from bastion.pipeline.errors import to_jsonrpc
from bastion.services.audit import Audit
from bastion.services.credentials import generation_of
from bastion.services.directory import Mounted
from bastion.services.proxy import Proxy
from bastion.types import json_object
from bastion.upstream.notifications import Notice
from bastion.upstream.pool import Lease, UpstreamPool
from bastion.upstream.relay import HANDSHAKE_VERSIONS, NO_PROFILE
from bastion.upstream.wire import WireResponse
from bastion.web.mcp.answer import Answer, CallRequest
from bastion.web.mcp.fastpath import FastPath, Upstream, call_record
from bastion.web.mcp.sessions import SESSION_HEADER, Handshake, Handshakes

REQUEST_CANCELLED: Final = -32800  # what the SDK answers a cancelled handshake-era request with
_SESSION: Final = SESSION_HEADER.encode("ascii")
_CHANGES: Final[dict[str, ServerEvent]] = {
    "notifications/tools/list_changed": ToolsListChanged(),
    "notifications/prompts/list_changed": PromptsListChanged(),
    "notifications/resources/list_changed": ResourcesListChanged(),
}


class HandshakePath:
    def __init__(self, fast: FastPath, proxy: Proxy, pool: UpstreamPool, audit: Audit, sessions: Handshakes) -> None:
        self.fast = fast
        self.proxy = proxy
        self.pool = pool
        self.audit = audit
        self._sessions = sessions
        self._ids = itertools.count(1)

    def upstream_id(self) -> str:
        """A request id of Bastion's own: the upstream session is shared by all of an identity's callers."""
        return f"bastion-{next(self._ids)}"

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
        routed = await self.fast.route(principal, request.name)
        if routed is None or not _handshake_server(routed[0]):
            return False
        mounted, tool = routed
        try:
            identity_id = self.proxy.identity_for(principal, mounted)
            lease = self.pool.cached_lease(
                mounted.server, identity_id, NO_PROFILE, await self.proxy.generation(principal, identity_id)
            )
        except BastionError:
            return False  # the full path answers it (enrolment needed, or the identity cannot be renewed)
        if lease is None or lease.protocol_version not in HANDSHAKE_VERSIONS:
            return False  # the full path opens the upstream session (and learns its era)
        if await self.fast.rejected(scope, send):
            return True
        self._sessions.touch(session.session_id, mounted.server.call_timeout_s)
        await _Call(self, principal, mounted, session, send, request, identity_id).run(tool, lease)
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

    async def lease(self, principal: Principal, mounted: Mounted) -> Lease:
        """The pooled session for the identity's current credential, opened if needed."""
        credential = await self.proxy.credential(principal, self.proxy.identity_for(principal, mounted))
        return await self.pool.lease(mounted.server, credential, NO_PROFILE, generation=generation_of(credential))


class _Call(Answer):
    """One forwarded call: its upstream request, the answer's stream, and what the caller is sent."""

    def __init__(
        self,
        path: HandshakePath,
        principal: Principal,
        mounted: Mounted,
        session: Handshake,
        send: Send,
        request: CallRequest,
        identity_id: str | None,
    ) -> None:
        record = call_record(principal, request.name, {"arguments": request.arguments})
        super().__init__(send, request, path.upstream_id(), mounted, session.session_id.encode(), record)
        self._path = path
        self._principal = principal
        self._session = session
        self._identity_id = identity_id
        self._upstream: Upstream | None = None
        self._lease: Lease | None = None
        self._current: str | None = None

    async def run(self, tool: str, lease: Lease) -> None:
        # The pooled session stays open for this call even if an edit takes it out of the pool meanwhile.
        with self._path.pool.using(lease):
            await self._run(tool, lease)

    async def _run(self, tool: str, lease: Lease) -> None:
        key = self._session.call_key(self.request.request_id)
        record = self.record
        server = self.mounted.server
        self._lease = lease
        async with self._path.audit.call(record):
            with anyio.CancelScope() as cancelled:
                # Registered before the event is written: a cancel that comes meanwhile counts.
                self._session.calls[key] = cancelled
                try:
                    admitted = await self._path.fast.admit(
                        self._principal, self.mounted, tool, record, self.request.arguments
                    )
                    self.results = admitted.results
                    self._upstream, self._current = await self._path.fast.upstream(self._principal, self.mounted)
                    body = self.request.upstream_body(tool, self.upstream_id, admitted.arguments)
                    async with self._path.pool.slot(server.id):
                        with anyio.fail_after(server.call_timeout_s):
                            await self._exchange(body)
                except BastionError as exc:
                    await self.fail_with(exc)
                except (OSError, UrlRefused, TimeoutError) as exc:
                    await self.failed(exc)
                finally:
                    if self._session.calls.get(key) is cancelled:
                        del self._session.calls[key]
            if cancelled.cancelled_caught and not self.answered:
                record.outcome, record.reason = "error", "cancelled"
                await self.fail(types.ErrorData(code=REQUEST_CANCELLED, message="Request cancelled"))
            await self.end()
            if not self.answered_upstream and self.posted:
                await self._cancel_upstream(
                    "the caller cancelled the request" if cancelled.cancelled_caught else "the call was abandoned"
                )

    async def _exchange(self, body: bytes) -> None:
        response = await self._post(body)
        status = response.status_code
        if status == Answer.UNAUTHORIZED or (status == Answer.NOT_FOUND and self._lease_session_id() is not None):
            # Nothing was done upstream: renew a refused token once, or open a fresh session for a forgotten one.
            await response.aclose()
            if status == Answer.UNAUTHORIZED:
                if not await self._path.proxy.renew(self._principal, self._identity_id, self._current):
                    await self.refused_credential()
                    return
            else:
                assert self._lease is not None  # noqa: S101  set by run
                self._path.pool.forget(self._lease)  # the old generation's session stays, for calls still on it
            self._lease = await self._path.lease(self._principal, self.mounted)
            self._upstream, self._current = await self._path.fast.upstream(self._principal, self.mounted)
            response = await self._post(body)
        if response.status_code in (Answer.UNAUTHORIZED, Answer.FORBIDDEN):
            self.started = self.answered = self.answered_upstream = True
            await self._path.fast.refusal(
                response, self._principal, self.mounted, self.record, self.send, self.request.request_id
            )
            return
        await self.relay(response, self._resume)

    def _headers(self) -> list[tuple[str, str]]:
        assert self._upstream is not None and self._lease is not None  # noqa: S101  set by run
        headers = [*self._upstream.headers, ("mcp-protocol-version", self._lease.protocol_version or "")]
        if self._lease.session_id is not None:
            headers.append((SESSION_HEADER, self._lease.session_id))
        return headers

    def _lease_session_id(self) -> str | None:
        return self._lease.session_id if self._lease is not None else None

    async def _post(self, body: bytes) -> WireResponse:
        assert self._upstream is not None  # noqa: S101  set by run
        headers = [
            *self._headers(),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ]
        response = await self._upstream.wire.post(
            headers, body, first_byte_timeout_s=self.mounted.server.call_timeout_s
        )
        self.posted = True
        return response

    async def _resume(self, last_event_id: str) -> WireResponse:
        """The call's stream again, from after ``last_event_id`` (the upstream closed it before answering)."""
        assert self._upstream is not None  # noqa: S101  set by run
        headers = [*self._headers(), ("accept", "text/event-stream"), ("last-event-id", last_event_id)]
        return await self._upstream.wire.get(headers, first_byte_timeout_s=self.mounted.server.call_timeout_s)

    async def reply_upstream(self, request: dict[str, Any]) -> None:
        """Answer a request of the upstream's as Bastion's upstream client would for a caller that declared nothing."""
        if request.get("method") == "ping":
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"], "result": {}}
        else:
            error = {"code": types.METHOD_NOT_FOUND, "message": f"the client does not support {request.get('method')}"}
            reply = {"jsonrpc": "2.0", "id": request["id"], "error": error}
        response = await self._post(json.dumps(reply).encode())
        await response.aclose()

    def notice(self, method: str, params: Any) -> None:
        """A change the upstream announced on the call's stream: told where the pooled session's would be."""
        event = _CHANGES.get(method)
        if method == "notifications/resources/updated" and isinstance(params, dict):
            uri = cast("dict[str, Any]", params).get("uri")
            event = ResourceUpdated(uri=uri) if isinstance(uri, str) else None
        if event is not None:
            self._path.pool.notices.publish(Notice(self.mounted.server.id, self._identity_id, event))

    async def _cancel_upstream(self, reason: str) -> None:
        notice = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": self.upstream_id, "reason": reason},
        }
        with anyio.move_on_after(Answer.CANCEL_TIMEOUT_S, shield=True):
            try:
                response = await self._post(json.dumps(notice).encode())
                await response.aclose()
            except (OSError, UrlRefused, TimeoutError):
                return  # best effort: the upstream may be what failed

    async def fail_with(self, exc: BastionError) -> None:
        self.record.failed(exc.code)
        await self.fail(to_jsonrpc(exc).error)


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
