"""Relaying an upstream's answer to a call, and reading from it what the audit log records.

The answer passes as it came unless something must change in it: content rules on results rewrite (or block) the
call's result, and a 2026-era result that names no ``resultType`` is completed (the caller's client would refuse it;
the spec's only other result type must say so). A JSON answer is held whole to do that (up to ``HOLD_BYTES``, or up
to ``MAX_ANSWER_BYTES`` when rules must read it); an event stream passes event by event, and only the event that
holds the call's answer is parsed, and only when it could need a change or holds an error.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final, Protocol, cast

from bastion.pipeline.errors import to_jsonrpc
from bastion.pipeline.frames import EVENT_END, MAX_ANSWER_BYTES, SSE, AnswerTooLarge, fields, media
from bastion.services.guard import ContentBlocked
from bastion.types import json_object

HOLD_BYTES: Final = 1024 * 1024  # a JSON answer up to this size is held to be read; larger ones pass as they come
Send = Callable[[dict[str, Any]], Awaitable[None]]  # an ASGI send: the caller's side of the HTTP exchange
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # an ASGI receive (after the body: the disconnect)
Results = Callable[[Any], Any]  # the content rules on results, applied to one result (raises ContentBlocked)


class Answer(Protocol):
    """What the relay reads of an upstream's HTTP answer."""

    status_code: int
    headers: list[tuple[bytes, bytes]]

    def chunks(self) -> Any: ...


def answer_status(answer: dict[str, Any]) -> str:
    """``ok``, ``error`` (a tool's error result) or the JSON-RPC error code of one JSON-RPC answer."""
    error = answer.get("error")
    if isinstance(error, dict):
        return str(cast("dict[str, Any]", error).get("code"))
    result = answer.get("result")
    return "error" if isinstance(result, dict) and cast("dict[str, Any]", result).get("isError") is True else "ok"


def scanned_answer(message: dict[str, Any], results: Results) -> dict[str, Any]:
    """A call's JSON-RPC answer with the content rules on results applied to its result: rewritten, or replaced by
    the JSON-RPC error of the rule that blocks it (the rule's outcome is on the audit record)."""
    result = message.get("result")
    if not isinstance(result, dict):
        return message
    try:
        scanned = results(result)
    except ContentBlocked as exc:
        error = to_jsonrpc(exc).error.model_dump(exclude_none=True)
        return {"jsonrpc": "2.0", "id": message.get("id"), "error": error}
    return {**message, "result": scanned}


class AnswerRelay:
    """Relays one call's answer from the upstream to the caller (see the module docstring)."""

    def __init__(self, send: Send, request_id: Any, results: Results | None, headers: Iterable[tuple[bytes, bytes]]):
        self._send = send
        self._request_id = request_id
        self._results = results
        self._headers = list(headers)  # the upstream's headers that travel to the caller
        self.started = False  # the caller has a status line
        self.status: str | None = None  # the upstream's answer as the audit log records it (before the rules)

    async def relay(self, answer: Answer) -> None:
        """Pass ``answer`` on. Afterwards ``status`` is the answer's (None: an HTTP error status without one).

        Raises:
            AnswerTooLarge: content rules must read an answer larger than ``MAX_ANSWER_BYTES`` (nothing was sent
                when it is a JSON answer; an event stream was cut short).
        """
        if media(answer.headers) == SSE:
            await self._events(answer)
        else:
            await self._whole(answer)
        if self.status is None and answer.status_code < 400:
            self.status = "ok"  # as it came: nothing in it said otherwise

    async def _start(self, status: int) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": self._headers})
        self.started = True

    async def _whole(self, answer: Answer) -> None:
        bound = MAX_ANSWER_BYTES if self._results is not None else HOLD_BYTES
        body = bytearray()
        chunks = answer.chunks().__aiter__()
        async for chunk in chunks:
            body += chunk
            if len(body) > bound:
                if self._results is not None:
                    raise AnswerTooLarge
                await self._start(answer.status_code)  # too large to hold: passed on as it comes
                await self._send({"type": "http.response.body", "body": bytes(body), "more_body": True})
                async for rest in chunks:
                    await self._send({"type": "http.response.body", "body": rest, "more_body": True})
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        raw = bytes(body)
        await self._start(answer.status_code)
        await self._send({"type": "http.response.body", "body": self.read(raw) or raw, "more_body": False})

    async def _events(self, answer: Answer) -> None:
        await self._start(answer.status_code)
        pending = bytearray()
        async for chunk in answer.chunks():
            pending += chunk
            start = 0
            out: list[bytes] = []
            while (end := EVENT_END.search(pending, start)) is not None:
                out.append(self._event(bytes(pending[start : end.end()])))
                start = end.end()
            if start:
                del pending[:start]
                await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if len(pending) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
        if pending:
            await self._send({"type": "http.response.body", "body": self._event(bytes(pending)), "more_body": True})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def _event(self, event: bytes) -> bytes:
        """The event as the caller gets it: the call's answer as ``read`` leaves it (its id kept), anything else as
        it came."""
        if b'"id"' not in event:
            return event  # notifications: progress, log messages
        data, event_id, _retry, _comment = fields(event)
        changed = self.read(data) if data else None
        if changed is None:
            return event
        head = f"id: {event_id}\r\n".encode() if event_id is not None else b""
        return head + b"event: message\r\ndata: " + changed + b"\r\n\r\n"

    def read(self, data: bytes) -> bytes | None:
        """Note the status of the call's answer in ``data``; the answer as the caller gets it when that differs
        from ``data`` (rules applied, ``resultType`` completed), else None."""
        rules = self._results is not None
        incomplete = b'"result"' in data and b'"resultType"' not in data
        if not (rules or incomplete or b'"error"' in data or b'"isError"' in data):
            return None  # most answers: nothing to change and nothing but "ok" to note
        message = json_object(data)
        if message is None or "method" in message or message.get("id") != self._request_id:
            return None
        self.status = answer_status(message)
        if self._results is not None:
            message = scanned_answer(message, self._results)
        elif not incomplete:
            return None
        result: Any = message.get("result")
        if isinstance(result, dict) and "resultType" not in result:
            cast("dict[str, Any]", result)["resultType"] = "complete"
        return json.dumps(message, separators=(",", ":")).encode()
