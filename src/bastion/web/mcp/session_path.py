"""The handshake-era hot path: a `tools/call` on a live session, posted into the pooled upstream session.

A handshake-era (2025-11-25 and earlier) caller's `tools/call` to a handshake-era Streamable HTTP upstream is
forwarded without the SDK's session server and client, which cost most of such a call's CPU. What the full path
would decide is decided the same way (session bound to the token, Host/Origin, routing, provisioning, the
audit event before anything leaves), and the call goes into the upstream session Bastion's pool already holds
for this identity. That session is shared by every caller of the identity, so:

- the request id is Bastion's own (``bastion-N``), mapped back on the answer, and no upstream SSE event id
  reaches the caller (a caller resuming with one would reach the SDK's event store, which never saw it);
- progress and log notifications on the call's stream pass through (the progress token is the caller's own);
- `notifications/cancelled` for a call in flight here cancels it upstream, and the caller's stream ends with
  the SDK's own answer for a cancelled request (-32800).

Only sessions whose caller declared no sampling, elicitation or roots are served here: a request from the
upstream could otherwise need the caller, and only the full path relays those. Should the upstream ask
anything all the same (a ping), Bastion answers it as its upstream client would. Everything else, and the
first call of an identity (which opens the upstream session), takes the full path.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from typing import Any, Final, cast

import anyio
import mcp_types as types
from mcp.client.streamable_http import DEFAULT_MAX_SSE_EVENT_SIZE
from starlette.types import Scope, Send

from bastion.domain.connections import Principal
from bastion.domain.models import ProtocolEra, Transport
from bastion.errors import BastionError
from bastion.net.outbound import UrlRefused
from bastion.services.audit import Audit, CallRecord
from bastion.services.credentials import generation_of
from bastion.services.directory import Mounted
from bastion.services.proxy import Proxy
from bastion.upstream.pool import Lease, UpstreamBusy, UpstreamPool
from bastion.upstream.refusals import FORBIDDEN, UNAUTHORIZED
from bastion.upstream.relay import HANDSHAKE_VERSIONS, NO_PROFILE
from bastion.upstream.wire import WireError, WireResponse
from bastion.web.mcp.fastpath import (
    FastPath,
    Upstream,
    answer_status,
    call_record,
    jsonrpc_error,
    refused,
    upstream_failure,
)
from bastion.web.mcp.server import UPSTREAM_UNAVAILABLE, to_jsonrpc
from bastion.web.mcp.sessions import SESSION_HEADER, Handshake, Handshakes

REQUEST_CANCELLED: Final = -32800  # what the SDK answers a cancelled handshake-era request with
NOT_FOUND: Final = 404
CANCEL_TIMEOUT_S: Final = 5.0
DRAIN_S: Final = 0.05  # longest an answered stream's remainder is read for its connection to be reused
_EVENT_END: Final = re.compile(rb"\r?\n\r?\n")
_SESSION: Final = SESSION_HEADER.encode("ascii")


class HandshakePath:
    def __init__(self, fast: FastPath, proxy: Proxy, pool: UpstreamPool, audit: Audit, sessions: Handshakes) -> None:
        self.fast = fast
        self.proxy = proxy
        self.pool = pool
        self._audit = audit
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
        try:
            decoded: Any = json.loads(body)
        except (ValueError, RecursionError):
            return False
        if not isinstance(decoded, dict):
            return False
        message = cast("dict[str, Any]", decoded)
        method = message.get("method")
        if method == "notifications/cancelled":
            return await self._cancel(session, message, send)
        params: Any = message.get("params")
        if method != "tools/call" or "id" not in message or not isinstance(params, dict):
            return False
        call = cast("dict[str, Any]", params)
        name = call.get("name")
        if session.profile != NO_PROFILE or not isinstance(name, str) or not (name.isascii() and name.isprintable()):
            return False
        routed = await self.fast.route(principal, name)
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
        if lease is None or lease.client.protocol_version not in HANDSHAKE_VERSIONS:
            return False  # the full path opens the upstream session (and learns its era)
        if await self.fast.rejected(scope, send):
            return True
        record = call_record(principal, name, call)
        request_id = message["id"]
        self._sessions.touch(session.session_id)
        async with self._audit.call(record):
            try:
                await self.fast.admit(principal, mounted, tool, record)
                upstream, current = await self.fast.upstream(principal, mounted)
            except BastionError as exc:
                record.outcome, record.reason = "error", exc.code
                await jsonrpc_error(send, request_id, to_jsonrpc(exc).error)
                return True
            call["name"] = tool
            call_ = _Call(self, principal, mounted, session, record, send, request_id)
            await call_.run(message, upstream, lease, current)
        self._sessions.touch(session.session_id)
        return True

    async def _cancel(self, session: Handshake, message: dict[str, Any], send: Send) -> bool:
        params: Any = message.get("params")
        request_id = cast("dict[str, Any]", params).get("requestId") if isinstance(params, dict) else None
        scope = session.calls.get(session.call_key(request_id)) if request_id is not None else None
        if scope is None:
            return False  # not a call of the hot path: the SDK's session cancels its own
        scope.cancel()
        await send({"type": "http.response.start", "status": 202, "headers": [(_SESSION, session.session_id.encode())]})
        await send({"type": "http.response.body", "body": b""})
        return True

    async def reopen(self, principal: Principal, mounted: Mounted, stale: Lease) -> tuple[Upstream, Lease]:
        """A fresh upstream session (the upstream forgot ``stale``'s), and the headers calls into it carry."""
        self.pool.forget(stale)
        identity_id = self.proxy.identity_for(principal, mounted)
        credential = await self.proxy.credential(principal, identity_id)
        lease = await self.pool.lease(mounted.server, credential, NO_PROFILE, generation=generation_of(credential))
        return (await self.fast.upstream(principal, mounted))[0], lease


class _Call:
    """One forwarded call: its upstream request, its answer's stream, and what the caller is sent."""

    def __init__(
        self,
        path: HandshakePath,
        principal: Principal,
        mounted: Mounted,
        session: Handshake,
        record: CallRecord,
        send: Send,
        request_id: Any,
    ) -> None:
        self._path = path
        self._principal = principal
        self._mounted = mounted
        self._session = session
        self._record = record
        self._send = send
        self._request_id = request_id
        self._upstream_id = path.upstream_id()
        self._streaming = False  # the caller has the SSE response's status line
        self._answered = False

    async def run(self, message: dict[str, Any], upstream: Upstream, lease: Lease, current: str | None) -> None:
        message["id"] = self._upstream_id
        body = json.dumps(message, separators=(",", ":")).encode()
        key = self._session.call_key(self._request_id)
        server = self._mounted.server
        timeout = server.call_timeout_s
        record = self._record
        with anyio.CancelScope() as cancelled:
            self._session.calls[key] = cancelled
            try:
                async with self._path.pool.slot(server.id):
                    with anyio.fail_after(timeout):
                        await self._exchange(body, upstream, lease, current)
            except UpstreamBusy as exc:
                record.outcome, record.reason = "error", exc.code
                await self._fail(to_jsonrpc(exc).error)
            except BastionError as exc:
                record.outcome, record.reason = "error", exc.code
                await self._fail(to_jsonrpc(exc).error)
            except (OSError, UrlRefused, TimeoutError) as exc:
                if isinstance(exc, TimeoutError) and not self._answered:
                    await self._cancel_upstream(upstream, lease, "the gateway's time limit for the call ran out")
                await self._fail(upstream_failure(exc, self._mounted, record))
            finally:
                self._session.calls.pop(key, None)
        if cancelled.cancelled_caught and not self._answered:
            record.outcome, record.reason = "error", "cancelled"
            await self._cancel_upstream(upstream, lease, "the caller cancelled the request")
            await self._fail(types.ErrorData(code=REQUEST_CANCELLED, message="Request cancelled"))
        await self._end_stream()

    async def _end_stream(self) -> None:
        if self._streaming:
            self._streaming = False
            with contextlib.suppress(OSError):  # the caller may be what went away
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _exchange(self, body: bytes, upstream: Upstream, lease: Lease, current: str | None) -> None:
        response = await self._post(upstream, lease, body)
        if response.status_code in (UNAUTHORIZED, NOT_FOUND):
            # Nothing was done upstream: renew a refused token once, or open a fresh session for a forgotten one.
            await response.aclose()
            if response.status_code == UNAUTHORIZED:
                identity_id = self._path.proxy.identity_for(self._principal, self._mounted)
                if not await self._path.proxy.renew(self._principal, identity_id, current):
                    self._record.outcome, self._record.reason = "error", "http_401"
                    self._record.upstream_status = str(UNAUTHORIZED)
                    await self._fail(refused(self._mounted))
                    return
            upstream, lease = await self._path.reopen(self._principal, self._mounted, lease)
            response = await self._post(upstream, lease, body)
        if response.status_code in (UNAUTHORIZED, FORBIDDEN):
            await self._path.fast.refusal(
                response, self._principal, self._mounted, self._record, self._send, self._request_id
            )
            self._answered = True
            return
        try:
            await self._relay(response, upstream, lease)
        finally:
            await response.aclose()

    async def _post(self, upstream: Upstream, lease: Lease, body: bytes) -> WireResponse:
        headers = [
            *upstream.headers,
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", lease.client.protocol_version),
        ]
        if lease.session_id is not None:
            headers.append((SESSION_HEADER, lease.session_id))
        return await upstream.wire.post(headers, body, first_byte_timeout_s=self._mounted.server.call_timeout_s)

    async def _relay(self, response: WireResponse, upstream: Upstream, lease: Lease) -> None:
        """Pass the upstream's answer on: JSON as JSON, an event stream as events (progress and logs included)."""
        status = response.status_code
        content_type = next((v for k, v in response.headers if k == b"content-type"), b"")
        media = content_type.split(b";")[0].strip().lower()
        if status != 200 or media not in (b"application/json", b"text/event-stream"):
            self._record.outcome, self._record.reason = "error", f"http_{status}"
            self._record.upstream_status = f"http_{status}"
            message = f"upstream {self._mounted.alias!r} answered HTTP {status} without a JSON-RPC answer"
            await self._fail(types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message))
            return
        if media == b"application/json":
            answer = await _read_bounded(response)
            if not await self._answer(answer):
                await self._ended()
            return
        await self._start_stream()
        pending = b""
        async for chunk in response.chunks():
            pending += chunk
            while (end := _EVENT_END.search(pending)) is not None:
                event, pending = pending[: end.start()], pending[end.end() :]
                if await self._event(event, upstream, lease):
                    await self._end_stream()
                    # The upstream ends its stream right after the answer: read to its end, so that the connection
                    # is kept for the next call instead of closed with unread bytes on it.
                    with anyio.move_on_after(DRAIN_S):
                        async for _ in response.chunks():
                            pass
                    return
            if len(pending) > DEFAULT_MAX_SSE_EVENT_SIZE:
                raise WireError("the upstream sent an event larger than the SDK accepts")
        await self._ended()

    async def _event(self, event: bytes, upstream: Upstream, lease: Lease) -> bool:
        """Handle one upstream SSE event; True once it was the call's answer."""
        data = b"\n".join(line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:"))
        if not data:
            return False  # a priming event (an id and a retry interval, for resumption the caller cannot use)
        return await self._answer(data, upstream, lease)

    async def _answer(self, data: bytes, upstream: Upstream | None = None, lease: Lease | None = None) -> bool:
        """One JSON-RPC message from the upstream: pass it on, or answer it; True once it was the call's answer."""
        try:
            decoded: Any = json.loads(data)
        except (ValueError, RecursionError):
            return False
        if not isinstance(decoded, dict):
            return False
        message = cast("dict[str, Any]", decoded)
        if "method" not in message:
            if message.get("id") != self._upstream_id:
                return False  # not this call's answer (a stray response has no one to reach here)
            message["id"] = self._request_id
            answer = answer_status(message)
            self._record.upstream_status = answer
            if answer not in ("ok", "error"):
                self._record.outcome, self._record.reason = "error", answer
            self._answered = True
            await self._emit(json.dumps(message, separators=(",", ":")).encode())
            return True
        if "id" in message:  # the upstream asks something of the caller, who declared nothing: as the SDK client
            if upstream is not None and lease is not None:
                await self._reply_upstream(message, upstream, lease)
            return False
        await self._emit(data)
        return False

    async def _reply_upstream(self, request: dict[str, Any], upstream: Upstream, lease: Lease) -> None:
        if request.get("method") == "ping":
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"], "result": {}}
        else:
            error = {"code": types.METHOD_NOT_FOUND, "message": f"the client does not support {request.get('method')}"}
            reply = {"jsonrpc": "2.0", "id": request["id"], "error": error}
        response = await self._post(upstream, lease, json.dumps(reply).encode())
        await response.aclose()

    async def _cancel_upstream(self, upstream: Upstream, lease: Lease, reason: str) -> None:
        notice = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": self._upstream_id, "reason": reason},
        }
        with anyio.move_on_after(CANCEL_TIMEOUT_S, shield=True):
            try:
                response = await self._post(upstream, lease, json.dumps(notice).encode())
                await response.aclose()
            except (OSError, UrlRefused, TimeoutError):
                return  # best effort: the upstream may be what failed

    async def _start_stream(self) -> None:
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache, no-transform"),
            (_SESSION, self._session.session_id.encode()),
        ]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        self._streaming = True

    async def _emit(self, data: bytes) -> None:
        if self._streaming:
            event = b"event: message\r\ndata: " + data + b"\r\n\r\n"
            await self._send({"type": "http.response.body", "body": event, "more_body": True})
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode("ascii")),
            (_SESSION, self._session.session_id.encode()),
        ]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._send({"type": "http.response.body", "body": data})

    async def _ended(self) -> None:
        """The upstream's answer ended without the call's result."""
        self._record.outcome, self._record.reason = "error", "upstream_unavailable"
        self._record.upstream_status = "unavailable"
        message = f"upstream {self._mounted.alias!r} ended its answer without a result"
        await self._fail(
            types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message, data={"code": "upstream_unavailable"})
        )

    async def _fail(self, error: types.ErrorData) -> None:
        """Answer the call with ``error``, on its event stream if the caller already has one."""
        if self._answered:
            return
        self._answered = True
        raw = {"jsonrpc": "2.0", "id": self._request_id, "error": error.model_dump(exclude_none=True)}
        if not self._streaming:
            await jsonrpc_error(self._send, self._request_id, error)
            return
        try:
            await self._emit(json.dumps(raw, separators=(",", ":")).encode())
        except OSError:
            return  # the caller went away


async def _read_bounded(response: WireResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.chunks():
        size += len(chunk)
        if size > DEFAULT_MAX_SSE_EVENT_SIZE:
            raise WireError("the upstream's answer is larger than the SDK accepts")
        chunks.append(chunk)
    return b"".join(chunks)


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
