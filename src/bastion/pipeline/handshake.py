"""The handshake-era relay: a `tools/call` on a live session, posted into the pooled upstream session.

A handshake-era (2025-11-25 and earlier) caller's `tools/call` to a handshake-era Streamable HTTP upstream is
forwarded without the SDK's session server and client, which cost most of such a call's CPU. What the full path
would decide is decided the same way (session bound to the token, Host/Origin, routing, provisioning, policy, rate
limits, content rules, the audit event before anything leaves), and the call goes into the upstream session
Bastion's pool already holds for this identity. That session is shared by every caller of the identity, so the
request is rebuilt from the call's name, arguments and `_meta`, with Bastion's own request id and progress token
(``bastion-N``), mapped back on the answer and on progress notifications. The answer is re-framed: JSON stays JSON;
an event stream's events are re-sent without upstream event ids (a caller resuming with one would reach the SDK's
event store, which never saw it), and Bastion itself resumes an upstream stream that closes before the answer. Of
the upstream's notifications on the call's stream, progress and log messages reach the caller, and change notices
go where the pooled session's would (``UpstreamNotices``). The caller's `notifications/cancelled` for a call in
flight here is answered as the SDK answers it (-32800) and passed on upstream.

Only sessions whose caller declared no sampling, elicitation or roots are served here: a request from the
upstream could otherwise need the caller, and only the full path relays those. Should the upstream ask
anything all the same (a ping), Bastion answers it as its upstream client would. Everything else, and the
first call of an identity (which opens the upstream session), takes the full path.

``CallRequest`` is a caller's `tools/call` as this relay accepts it; ``Answer`` reads an upstream's answer (JSON,
or an event stream it may have to resume) and tells the caller the call's result, its progress and its log
messages, in the framing the SDK's own server would have used; ``HandshakeCall`` is one call through it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import anyio
import mcp_types as types
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)

from bastion.domain.connections import Principal
from bastion.errors import BastionError
from bastion.net.outbound import UrlRefused
from bastion.pipeline.admission import Admission, Upstream, call_record, send_error
from bastion.pipeline.answers import Send, answer_status, scanned_answer
from bastion.pipeline.errors import (
    UPSTREAM_UNAVAILABLE,
    answer_too_large,
    refused,
    to_jsonrpc,
    unavailable,
    upstream_failure,
)
from bastion.pipeline.frames import EVENT_END, JSON, MAX_ANSWER_BYTES, SSE, AnswerTooLarge, fields, media
from bastion.pipeline.modern import ModernRelay
from bastion.services.audit import CallRecord
from bastion.services.credentials import generation_of
from bastion.services.directory import Mounted
from bastion.types import json_object
from bastion.upstream.notifications import Notice
from bastion.upstream.pool import Lease
from bastion.upstream.relay import NO_PROFILE
from bastion.upstream.wire import WireResponse

MAX_RESUMES: Final = 2  # as the SDK client: failed reconnections in a row to a stream that closed unanswered
MAX_RETRY_S: Final = 5.0  # longest wait before resuming, whatever retry interval the upstream asked for
DEFAULT_RETRY_S: Final = 0.1
DRAIN_S: Final = 0.05  # longest an answered stream's remainder is read, for its connection to be reused
SEND_TIMEOUT_S: Final = 5.0  # longest the call's answer waits for a caller that stopped reading
REQUEST_CANCELLED: Final = -32800  # what the SDK answers a cancelled handshake-era request with
SESSION_HEADER: Final = "mcp-session-id"
_CHANGES: Final[dict[str, ServerEvent]] = {
    "notifications/tools/list_changed": ToolsListChanged(),
    "notifications/prompts/list_changed": PromptsListChanged(),
    "notifications/resources/list_changed": ResourcesListChanged(),
}


class Session(Protocol):
    """The caller's handshake-era session, as a call on it sees it: its id, and its calls in flight (to cancel)."""

    session_id: str
    calls: dict[Any, anyio.CancelScope]

    def call_key(self, request_id: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A caller's `tools/call` in the shape the hot path forwards (anything else takes the full path)."""

    request_id: int | str
    name: str
    arguments: dict[str, Any] | None
    meta: dict[str, Any] | None

    @classmethod
    def of(cls, message: dict[str, Any]) -> CallRequest | None:
        request_id = message.get("id")
        params: Any = message.get("params")
        if (
            message.get("jsonrpc") != "2.0"
            or message.get("method") != "tools/call"
            or isinstance(request_id, bool)
            or not isinstance(request_id, int | str)
            or not isinstance(params, dict)
        ):
            return None
        call = cast("dict[str, Any]", params)
        name, arguments, meta = call.get("name"), call.get("arguments"), call.get("_meta")
        if (
            set(call) - {"name", "arguments", "_meta"}  # a task, or anything newer: the SDK knows what it means
            or not isinstance(name, str)
            or not (name.isascii() and name.isprintable())  # lone surrogates and non-ASCII: the full path's
            or not isinstance(arguments, dict | None)
            or not isinstance(meta, dict | None)
        ):
            return None
        return cls(request_id, name, cast("dict[str, Any] | None", arguments), cast("dict[str, Any] | None", meta))

    @property
    def progress_token(self) -> Any:
        return self.meta.get("progressToken") if self.meta is not None else None

    def upstream_body(self, tool: str, upstream_id: str, arguments: dict[str, Any] | None) -> bytes:
        """The request as the upstream gets it: the server's own tool name, the ``arguments`` as admission left them,
        Bastion's id and progress token."""
        params: dict[str, Any] = {"name": tool}
        if arguments is not None:
            params["arguments"] = arguments
        if self.meta is not None:
            meta = dict(self.meta)
            if "progressToken" in meta:  # the caller's token could be another caller's on the shared session
                meta["progressToken"] = upstream_id
            params["_meta"] = meta
        message = {"jsonrpc": "2.0", "id": upstream_id, "method": "tools/call", "params": params}
        return json.dumps(message, separators=(",", ":")).encode()


@dataclass(slots=True)
class _Stream:
    """Where a call's event stream is, across the upstream's closing and Bastion's resuming it."""

    last_id: str | None = None
    retry_s: float = DEFAULT_RETRY_S


class _Refused:
    """A resumption that could not be made (or was not an event stream): counted as a failed attempt."""

    status_code: Final = 0
    headers: Final[list[tuple[bytes, bytes]]] = []

    async def aclose(self) -> None:
        return None


_REFUSED: Final = cast("WireResponse", _Refused())


class Answer(ABC):
    """The caller's side of one call: what it was sent so far, and how the rest is sent."""

    UNAUTHORIZED: Final = 401
    FORBIDDEN: Final = 403
    NOT_FOUND: Final = 404
    CANCEL_TIMEOUT_S: Final = 5.0

    def __init__(
        self,
        send: Send,
        request: CallRequest,
        upstream_id: str,
        mounted: Mounted,
        session_id: bytes,
        record: CallRecord,
    ) -> None:
        self.send = send
        self.request = request
        self.upstream_id = upstream_id
        self.mounted = mounted
        self.record = record
        self._session_id = session_id
        self.started = False  # the caller has a status line
        self._stream = False  # ... of an event stream
        self._closed = False  # ... and its end
        self.answered = False  # the caller has (or is being sent) the call's answer
        self.answered_upstream = False  # the upstream answered: there is nothing to cancel there
        self.posted = False  # the call was sent upstream
        self.results: Callable[[Any], Any] | None = None  # the content rules the result must pass, if any

    # --- what the upstream may need in between (the subclass talks to it) -----------------------------------------

    @abstractmethod
    async def reply_upstream(self, request: dict[str, Any]) -> None:
        """Answer a request the upstream sent on the call's stream."""

    @abstractmethod
    def notice(self, method: str, params: Any) -> None:
        """Tell a change the upstream announced on the call's stream where the pooled session's would go."""

    # --- reading the upstream's answer -----------------------------------------------------------------------------

    async def relay(self, response: WireResponse, resume: Callable[[str], Awaitable[WireResponse]]) -> None:
        """Pass the answer on: JSON as JSON, an event stream as events, resumed if it closes before the answer."""
        current = response
        try:
            status, kind = current.status_code, _media(current)
            if status != 200 or kind not in (JSON, SSE):
                # A JSON-RPC error at an HTTP error status is still the call's answer (the SDK client reads it so).
                if not (kind == JSON and await self._json(current)):
                    self.record.upstream_status = f"http_{status}"
                    self.record.outcome, self.record.reason = "error", f"http_{status}"
                    message = f"upstream {self.mounted.alias!r} answered HTTP {status} without a JSON-RPC answer"
                    await self.fail(types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message))
                return
            if kind == JSON:
                if not await self._json(current) and not self.answered:
                    await self.ended()
                return
            # The caller's event stream starts with the first message before the answer: an answer that comes
            # first goes back as a JSON response (the caller accepts either; it is one write less).
            stream = _Stream()
            failures = 0
            while True:
                delivered = await self._events(current, stream) if current.status_code == 200 else False
                if self.answered:
                    return
                # As the SDK client: a stream that delivered resets the count; empty or refused resumptions add up.
                failures = 0 if delivered else failures + 1
                if stream.last_id is None or failures > MAX_RESUMES:
                    await self.ended()
                    return
                await current.aclose()
                await anyio.sleep(stream.retry_s)
                try:
                    current = await resume(stream.last_id)
                except (OSError, UrlRefused):
                    current = _REFUSED
                if _media(current) != SSE:
                    await current.aclose()
                    current = _REFUSED
        except AnswerTooLarge:
            await self.fail(answer_too_large(self.mounted, self.record))
        finally:
            await current.aclose()

    async def _json(self, response: WireResponse) -> bool:
        body = bytearray()
        while (chunk := await response.next_chunk()) is not None:
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
        return await self._message(bytes(body), stream=False)

    async def _events(self, response: WireResponse, stream: _Stream) -> bool:
        """Handle the stream's events until it ends or answers the call; whether it delivered any event."""
        pending, scan = bytearray(), 0
        delivered = False
        while (chunk := await response.next_chunk()) is not None:
            pending += chunk
            while (end := EVENT_END.search(pending, max(scan - 3, 0))) is not None:
                event = bytes(pending[: end.start()])
                del pending[: end.end()]
                scan = 0
                data, event_id, retry_ms, comment = fields(event)
                delivered = delivered or bool(data) or event_id is not None
                stream.last_id = event_id if event_id is not None else stream.last_id
                if retry_ms is not None:
                    stream.retry_s = min(retry_ms / 1000, MAX_RETRY_S)
                if data and await self._message(data, stream=True):
                    await self.end()
                    # The upstream ends its stream right after the answer: read to its end, so that the connection
                    # is kept for the next call instead of closed with unread bytes on it.
                    with anyio.move_on_after(DRAIN_S):
                        while await response.next_chunk() is not None:
                            pass
                    return True
                if not data and comment:
                    await self._keepalive()
            scan = len(pending)
            if scan > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
        return delivered

    async def _message(self, data: bytes, *, stream: bool) -> bool:
        """One JSON-RPC message from the upstream: pass it on, answer it or drop it; True once it was the answer."""
        message = json_object(data)
        if message is None:
            return False
        method = message.get("method")
        if method is None:
            if message.get("id") != self.upstream_id:
                return False  # not this call's answer (a stray response has no one to reach here)
            message["id"] = self.request.request_id
            self.answered_upstream = True
            status = answer_status(message)
            self.record.upstream_status = status
            if status not in ("ok", "error"):
                self.record.outcome, self.record.reason = "error", status
            if self.results is not None:
                message = scanned_answer(message, self.results)
            await self._answer(json.dumps(message, separators=(",", ":")).encode())
            return True
        if not stream or not isinstance(method, str):
            return False  # a JSON body holds the answer or nothing the caller could use
        params: Any = message.get("params")
        if "id" in message:
            await self.reply_upstream(message)
        elif method == "notifications/progress" and isinstance(params, dict):
            progress = cast("dict[str, Any]", params)
            if progress.get("progressToken") == self.upstream_id:
                progress["progressToken"] = self.request.progress_token
                await self._event(json.dumps(message, separators=(",", ":")).encode())
        elif method == "notifications/message":
            await self._event(json.dumps(message, separators=(",", ":")).encode())
        else:
            self.notice(method, params)
        return False

    # --- writing to the caller ---------------------------------------------------------------------------------

    async def _start_stream(self) -> None:
        headers = [
            (b"content-type", SSE),
            (b"cache-control", b"no-cache, no-transform"),
            (b"x-accel-buffering", b"no"),
            (b"mcp-session-id", self._session_id),
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = self._stream = True

    async def _event(self, data: bytes) -> None:
        """A message before the answer (progress, a log line): on the caller's event stream, started if need be."""
        if not self._stream:
            await self._start_stream()
        await self._emit(data)

    async def _emit(self, data: bytes) -> None:
        """``data`` as the stream's next event, or as the whole JSON response when no stream was started."""
        if self._stream:
            if not self._closed:
                event = b"event: message\r\ndata: " + data + b"\r\n\r\n"
                await self.send({"type": "http.response.body", "body": event, "more_body": True})
            return
        headers = [
            (b"content-type", JSON),
            (b"content-length", str(len(data)).encode("ascii")),
            (b"mcp-session-id", self._session_id),
        ]
        self.started = self._closed = True
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})

    async def _answer(self, data: bytes) -> None:
        """Send the call's answer, whole even if the call is being cancelled meanwhile."""
        self.answered = True
        with anyio.move_on_after(SEND_TIMEOUT_S, shield=True), contextlib.suppress(OSError):
            await self._emit(data)

    async def _keepalive(self) -> None:
        if not self._stream:
            await self._start_stream()
        if not self._closed:
            await self.send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})

    async def end(self) -> None:
        """End the caller's event stream (a JSON answer is complete as sent)."""
        if self._stream and not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # the caller may be what went away
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def fail(self, error: types.ErrorData) -> None:
        """Answer the call with ``error``: on its event stream if it has one, else as a JSON-RPC error response."""
        if self.answered or self._closed:
            return
        if self._stream:
            raw = {"jsonrpc": "2.0", "id": self.request.request_id, "error": error.model_dump(exclude_none=True)}
            await self._answer(json.dumps(raw, separators=(",", ":")).encode())
            return
        self.answered = self.started = self._closed = True
        with anyio.move_on_after(SEND_TIMEOUT_S, shield=True), contextlib.suppress(OSError):
            await send_error(self.send, self.request.request_id, error)

    async def failed(self, exc: OSError | UrlRefused | TimeoutError) -> None:
        await self.fail(upstream_failure(exc, self.mounted, self.record))

    async def refused_credential(self) -> None:
        await self.fail(refused(self.mounted, self.record))

    async def ended(self) -> None:
        """The upstream's answer ended without the call's result."""
        await self.fail(unavailable(self.mounted, self.record, "ended its answer without a result"))


def _media(response: WireResponse) -> bytes:
    return media(response.headers)


class HandshakeRelay:
    """Relays handshake-era calls into pooled upstream sessions (see the module docstring)."""

    def __init__(self, admission: Admission, modern: ModernRelay) -> None:
        self.admission = admission
        self.modern = modern  # whose refusal mapping a 401 or 403 that stands gets
        self._ids = itertools.count(1)

    def upstream_id(self) -> str:
        """A request id of Bastion's own: the upstream session is shared by all of an identity's callers."""
        return f"bastion-{next(self._ids)}"

    async def lease(self, principal: Principal, mounted: Mounted) -> Lease:
        """The pooled session for the identity's current credential, opened if needed."""
        proxy = self.admission.proxy
        credential = await proxy.credential(principal, proxy.identity_for(principal, mounted))
        return await self.admission.pool.lease(
            mounted.server, credential, NO_PROFILE, generation=generation_of(credential)
        )


class HandshakeCall(Answer):
    """One forwarded call: its upstream request, the answer's stream, and what the caller is sent."""

    def __init__(
        self,
        path: HandshakeRelay,
        principal: Principal,
        mounted: Mounted,
        session: Session,
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
        with self._path.admission.pool.using(lease):
            await self._run(tool, lease)

    async def _run(self, tool: str, lease: Lease) -> None:
        key = self._session.call_key(self.request.request_id)
        record = self.record
        server = self.mounted.server
        self._lease = lease
        async with self._path.admission.audit.call(record):
            with anyio.CancelScope() as cancelled:
                # Registered before the event is written: a cancel that comes meanwhile counts.
                self._session.calls[key] = cancelled
                try:
                    admitted = await self._path.admission.admit(
                        self._principal, self.mounted, tool, record, self.request.arguments
                    )
                    self.results = admitted.results
                    self._upstream, self._current = await self._path.admission.upstream(self._principal, self.mounted)
                    body = self.request.upstream_body(tool, self.upstream_id, admitted.arguments)
                    async with self._path.admission.pool.slot(server.id):
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
                self.record.upstream_status = str(status)  # until the retry answers (a renewal may fail instead)
                proxy = self._path.admission.proxy
                if not await proxy.renew(self._principal, self.mounted, self._identity_id, self._current):
                    await self.refused_credential()
                    return
            else:
                assert self._lease is not None  # noqa: S101  set by run
                if not self._path.admission.pool.retries.may_retry(self.mounted.server.id):
                    # Answered here, not raised: the upstream did answer (404), which is no failure of it.
                    forgot = unavailable(self.mounted, self.record, "no longer knows the session", str(status))
                    await self.fail(forgot)
                    return
                # The old generation's session stays, for calls still on it.
                self._path.admission.pool.forget(self._lease)
            self._lease = await self._path.lease(self._principal, self.mounted)
            self._upstream, self._current = await self._path.admission.upstream(self._principal, self.mounted)
            response = await self._post(body)
        if response.status_code in (Answer.UNAUTHORIZED, Answer.FORBIDDEN):
            self.started = self.answered = self.answered_upstream = True
            await self._path.modern.refusal(
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
            self._path.admission.pool.notices.publish(Notice(self.mounted.server.id, self._identity_id, event))

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
