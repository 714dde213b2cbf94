"""The wire work of the handshake-era hot path: the request it posts, and the answer it relays to the caller.

``CallRequest`` is a caller's `tools/call` as the hot path accepts it; ``Answer`` reads an upstream's answer
(JSON, or an event stream it may have to resume) and tells the caller the call's result, its progress and its
log messages, in the framing the SDK's own server would have used.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import anyio
import mcp_types as types
from starlette.types import Send

from bastion.net.outbound import UrlRefused
from bastion.pipeline.answers import answer_status, scanned_answer
from bastion.pipeline.errors import UPSTREAM_UNAVAILABLE, refused, upstream_failure
from bastion.pipeline.frames import EVENT_END, JSON, MAX_ANSWER_BYTES, SSE, AnswerTooLarge, fields, media
from bastion.services.audit import CallRecord
from bastion.services.directory import Mounted
from bastion.types import json_object
from bastion.upstream.wire import WireResponse
from bastion.web.mcp.fastpath import jsonrpc_error

MAX_RESUMES: Final = 2  # as the SDK client: failed reconnections in a row to a stream that closed unanswered
MAX_RETRY_S: Final = 5.0  # longest wait before resuming, whatever retry interval the upstream asked for
DEFAULT_RETRY_S: Final = 0.1
DRAIN_S: Final = 0.05  # longest an answered stream's remainder is read, for its connection to be reused
SEND_TIMEOUT_S: Final = 5.0  # longest the call's answer waits for a caller that stopped reading


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
            self.record.outcome, self.record.reason = "error", "upstream_answer_too_large"
            message = f"the answer of upstream {self.mounted.alias!r} is larger than {MAX_ANSWER_BYTES} bytes"
            await self.fail(types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message))
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
            await jsonrpc_error(self.send, self.request.request_id, error)

    async def failed(self, exc: OSError | UrlRefused | TimeoutError) -> None:
        await self.fail(upstream_failure(exc, self.mounted, self.record))

    async def refused_credential(self) -> None:
        self.record.outcome, self.record.reason = "error", f"http_{Answer.UNAUTHORIZED}"
        self.record.upstream_status = str(Answer.UNAUTHORIZED)
        await self.fail(refused(self.mounted))

    async def ended(self) -> None:
        """The upstream's answer ended without the call's result."""
        self.record.outcome, self.record.reason = "error", "upstream_unavailable"
        self.record.upstream_status = "unavailable"
        message = f"upstream {self.mounted.alias!r} ended its answer without a result"
        await self.fail(
            types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message, data={"code": "upstream_unavailable"})
        )


def _media(response: WireResponse) -> bytes:
    return media(response.headers)
