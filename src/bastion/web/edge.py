"""The listener's own limits, held before a request reaches the app (and so before any authentication).

A request head (request line and headers) is bounded in bytes and in fields, and must arrive within
`head_timeout_s` of the connection opening or of its first byte. Open connections are bounded too: at the
bound, a new connection takes the place of the oldest one still sending its head, then of the oldest idle
keep-alive one, and only when neither exists is it refused (503). A flood of half-sent heads therefore
never keeps /healthz (or anyone whose head arrives whole) out. Refusals are counted and logged as one
summary line per minute at most, never one line each.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bastion.summaries import Tally
from bastion.web.problems import problem_bytes

logger = logging.getLogger("bastion.edge")

MAX_HEAD_BYTES: Final = 32 * 1024
MAX_HEADER_FIELDS: Final = 100
SWEEP_EVERY_S: Final = 1.0  # how often half-sent heads are checked against the timeout (at most)
_TOO_LARGE: Final = f"the request head is over {MAX_HEAD_BYTES} bytes"
_TOO_MANY: Final = "too many open connections; retry shortly"
_HEAD_TOO_LARGE: Final = "request_head_too_large"  # the problem's code; the tally counts it with spaces


@dataclass(frozen=True, slots=True)
class Limits:
    head_timeout_s: float
    max_connections: int


def _raw_answer(status: HTTPStatus, code: str, detail: str) -> bytes:
    body = problem_bytes(status.value, code, status.phrase, detail)
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _refusal_app(status: HTTPStatus, code: str, detail: str) -> Any:
    body = problem_bytes(status.value, code, status.phrase, detail)

    async def app(_scope: Any, _receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status.value, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class Door:
    """The connections of one listener: which are still sending a head (since when), which idle between requests.

    One sweep, while any head is arriving, closes those not whole within the timeout: no timer per request.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.tally = Tally(logger, "connections refused at the door")
        self._open: set[EdgeProtocol] = set()
        # Insertion-ordered, so by when each head began: the first key is the oldest.
        self._heads: dict[EdgeProtocol, float] = {}
        self._idle: dict[EdgeProtocol, None] = {}
        self._sweep_every_s = min(SWEEP_EVERY_S, limits.head_timeout_s / 4)
        self._sweep: asyncio.TimerHandle | None = None

    def admit(self, connection: EdgeProtocol, now: float) -> bool:
        """Whether ``connection`` may stay; at the bound, the oldest half-sent head or idle connection makes room."""
        if len(self._open) >= self.limits.max_connections:
            victim = next(iter(self._heads), None) or next(iter(self._idle), None)
            if victim is None:
                self.tally.note("at the connection limit")
                return False
            self.forget(victim)
            victim.transport.close()
            self.tally.note("evicted to make room")
        self._open.add(connection)
        self._heads[connection] = now
        self._sweep_soon(connection.loop)
        return True

    def head_begun(self, connection: EdgeProtocol) -> None:
        if self._idle.pop(connection, 0) is None:  # a keep-alive connection's next request: its head starts now
            self._heads[connection] = connection.loop.time()
            self._sweep_soon(connection.loop)

    def head_ended(self, connection: EdgeProtocol) -> None:
        self._heads.pop(connection, None)

    def idle(self, connection: EdgeProtocol) -> None:
        if connection in self._open and connection not in self._heads:  # not already sending its next head
            self._idle[connection] = None

    def forget(self, connection: EdgeProtocol) -> None:
        self._open.discard(connection)
        self._heads.pop(connection, None)
        self._idle.pop(connection, None)

    def _sweep_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweep is None:
            due = loop.time() + self._sweep_every_s
            self._sweep = loop.call_at(due, self._sweep_heads, loop, due)

    def _sweep_heads(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._sweep = None
        now = loop.time()
        if now - due > self._sweep_every_s:
            # The loop was held up (uvloop runs due timers before it reads): bytes that arrived meanwhile are read
            # before any head is judged late.
            self._sweep_soon(loop)
            return
        began_by = now - self.limits.head_timeout_s
        late: list[EdgeProtocol] = []
        for connection, began in self._heads.items():
            if began > began_by:
                break
            late.append(connection)
        for connection in late:
            self.forget(connection)
            connection.head_too_slow()
        if self._heads:
            self._sweep_soon(loop)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the door's limits; `protocol(limits)` binds it to one listener's door."""

    door: ClassVar[Door]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the bytes arriving belong to a request head
        self._head_bytes = 0  # received since the head began: at least the head's size

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.door.admit(self, self.loop.time()):
            refusal = _raw_answer(HTTPStatus.SERVICE_UNAVAILABLE, "too_many_connections", _TOO_MANY)
            transport.write(refusal)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head that completed within this data was measured as parsed (on_headers_complete): the same data
        # may carry the start of the body. One still arriving is measured by the bytes received since it began.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._close_with(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _HEAD_TOO_LARGE, _TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.door.head_begun(self)

    def on_headers_complete(self) -> None:
        self.door.head_ended(self)
        self._in_head = False
        refusal = self._refusal()
        self._head_bytes = 0
        if refusal is None:
            super().on_headers_complete()
            return
        self.door.tally.note(_HEAD_TOO_LARGE.replace("_", " "))
        app = self.app
        self.app = _refusal_app(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _HEAD_TOO_LARGE, refusal)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _refusal(self) -> str | None:
        if len(self.headers) > MAX_HEADER_FIELDS:
            return f"the request has over {MAX_HEADER_FIELDS} header fields"
        # The bytes received bound the head's size from above: it is measured as parsed only when they are over.
        if self._head_bytes > MAX_HEAD_BYTES and len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > (
            MAX_HEAD_BYTES
        ):
            return _TOO_LARGE
        return None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()
        if not queued and not self.transport.is_closing():
            self.door.idle(self)

    def head_too_slow(self) -> None:
        """Called by the door's sweep: the head did not arrive whole within the timeout."""
        if not self.transport.is_closing():
            detail = f"the request head did not arrive within {self.door.limits.head_timeout_s:g} s"
            self._close_with(HTTPStatus.REQUEST_TIMEOUT, "request_head_too_slow", detail)

    def _close_with(self, status: HTTPStatus, code: str, detail: str) -> None:
        self.door.tally.note(code.replace("_", " "))
        self.door.forget(self)
        self.transport.write(_raw_answer(status, code, detail))
        self.transport.close()


def protocol(limits: Limits) -> type[EdgeProtocol]:
    """An `EdgeProtocol` class with a door of its own, for one uvicorn listener (`uvicorn.Config(http=...)`)."""
    return type("EdgeProtocol", (EdgeProtocol,), {"door": Door(limits)})
