"""The listener's limits (web/edge.py) on a real uvicorn socket: heads bounded in size, fields and time, and
connections bounded so that a flood of half-sent heads never keeps a whole request out."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bastion.web import edge
from tests.mcp_support import serving

pytestmark = pytest.mark.anyio
BOUND_S = 10  # an upper bound on any wait below, never a timing


class _App:
    """What reached the app: each request's path. `/slow` answers once `release` is set."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.release = anyio.Event()
        self.entering, self.entered = anyio.create_memory_object_stream[str](100)

    def asgi(self) -> Starlette:
        async def healthz(request: Request) -> PlainTextResponse:
            self.seen.append(request.url.path)
            return PlainTextResponse("ok")

        async def echo(request: Request) -> PlainTextResponse:
            self.seen.append(request.url.path)
            return PlainTextResponse(str(len(await request.body())))

        async def slow(request: Request) -> PlainTextResponse:
            self.seen.append(request.url.path)
            await self.entering.send(request.url.path)
            await self.release.wait()
            return PlainTextResponse("done")

        routes = [Route("/healthz", healthz), Route("/echo", echo, methods=["POST"]), Route("/slow", slow)]
        return Starlette(routes=routes)


class _Clients:
    """Raw client connections to one listener, all closed when the test leaves it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: list[SocketStream] = []

    async def connect(self) -> SocketStream:
        stream = await anyio.connect_tcp("127.0.0.1", self.port)
        self.streams.append(stream)
        return stream


@asynccontextmanager
async def _door(
    app: _App, *, head_timeout_s: float = 30.0, max_connections: int = 64
) -> AsyncGenerator[_Clients, None]:
    protocol = edge.protocol(edge.Limits(head_timeout_s=head_timeout_s, max_connections=max_connections))
    clients: _Clients | None = None
    try:
        async with serving(app.asgi(), http=protocol) as url:
            clients = _Clients(int(url.rsplit(":", 1)[1]))
            try:
                yield clients
            finally:
                app.release.set()
                for stream in clients.streams:
                    await stream.aclose()
    finally:
        app.entered.close()
        app.entering.close()


async def _until_closed(stream: SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with anyio.fail_after(BOUND_S):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


async def _one_answer(stream: SocketStream) -> bytes:
    """One complete answer with a content-length, on a connection that stays open."""
    received = b""
    with anyio.fail_after(BOUND_S):
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
        head, body = received.split(b"\r\n\r\n", 1)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        while len(body) < length:
            body += await stream.receive()
    return head.split(b"\r\n", 1)[0] + b"\r\n\r\n" + body


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _problem(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def _get(path: str, *extra: bytes, close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *extra]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def test_a_head_over_the_byte_bound_is_refused_431_before_the_app_sees_it() -> None:
    app = _App()
    async with _door(app) as door:
        whole = await door.connect()
        await whole.send(_get("/healthz", b"X-Big: " + b"a" * edge.MAX_HEAD_BYTES))
        answer = await _until_closed(whole)
        assert _status(answer) == 431
        problem = _problem(answer)
        assert (problem["code"], problem["detail"]) == (
            "request_head_too_large",
            f"the request head is over {edge.MAX_HEAD_BYTES} bytes",
        )

        # Still arriving (no end of head yet): refused once the bytes received pass the bound.
        endless = await door.connect()
        await endless.send(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (2 * edge.MAX_HEAD_BYTES))
        assert _status(await _until_closed(endless)) == 431

        fine = await door.connect()
        await fine.send(_get("/healthz", b"X-Fine: " + b"a" * (edge.MAX_HEAD_BYTES // 2), close=True))
        assert _status(await _until_closed(fine)) == 200
    assert app.seen == ["/healthz"]


async def test_a_head_with_more_header_fields_than_the_bound_is_refused_431() -> None:
    app = _App()
    async with _door(app) as door:
        fields = [f"X-F{i}: v".encode() for i in range(edge.MAX_HEADER_FIELDS - 2)]  # with Host and Connection
        at_bound = await door.connect()
        await at_bound.send(_get("/healthz", *fields, close=True))
        assert _status(await _until_closed(at_bound)) == 200

        over = await door.connect()
        await over.send(_get("/healthz", *fields, b"X-One-More: v", close=True))
        answer = await _until_closed(over)
        assert _status(answer) == 431
        problem = _problem(answer)
        assert (problem["code"], problem["detail"]) == (
            "request_head_too_large",
            f"the request has over {edge.MAX_HEADER_FIELDS} header fields",
        )
    assert app.seen == ["/healthz"]


async def test_a_body_far_larger_than_the_head_bound_arriving_with_its_head_is_not_taken_for_the_head() -> None:
    app = _App()
    body = b"x" * (1024 * 1024)
    async with _door(app) as door:
        stream = await door.connect()
        head = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        await stream.send(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = await _until_closed(stream)
    assert _status(answer) == 200 and answer.endswith(str(len(body)).encode())


async def test_a_head_not_sent_in_time_gets_408_while_slow_answers_and_idle_keep_alives_are_left_alone() -> None:
    app = _App()
    async with _door(app, head_timeout_s=0.5) as door:
        working = await door.connect()
        await working.send(_get("/slow"))
        idle = await door.connect()
        await idle.send(_get("/healthz"))
        assert _status(await _one_answer(idle)) == 200

        half = await door.connect()
        await half.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sl")
        silent = await door.connect()
        for stream in (half, silent):
            answer = await _until_closed(stream)
            assert _status(answer) == 408
            problem = _problem(answer)
            assert (problem["code"], problem["detail"]) == (
                "request_head_too_slow",
                "the request head did not arrive within 0.5 s",
            )

        # Both timers ran out: the call whose head arrived whole, and the idle connection, were not cut.
        app.release.set()
        assert await _one_answer(working) == b"HTTP/1.1 200 OK\r\n\r\ndone"
        await idle.send(_get("/healthz"))
        assert _status(await _one_answer(idle)) == 200
    assert app.seen == ["/slow", "/healthz", "/healthz"]


async def test_half_sent_heads_at_the_connection_bound_make_room_and_whole_requests_keep_being_answered() -> None:
    app = _App()
    async with _door(app, max_connections=4) as door:
        heads: list[SocketStream] = []
        for _ in range(6):
            stream = await door.connect()
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            heads.append(stream)
        for _ in range(3):
            probe = await door.connect()
            await probe.send(_get("/healthz", close=True))
            assert _status(await _until_closed(probe)) == 200

        # Each newcomer took the place of the oldest half-sent head: the first ones were closed unanswered.
        for stream in heads[:3]:
            assert await _until_closed(stream) == b""
        for stream in heads[3:5]:
            await stream.send(b"Connection: close\r\n\r\n")
            assert _status(await _until_closed(stream)) == 200
    assert app.seen == ["/healthz"] * 5


async def test_a_new_connection_is_refused_503_only_when_every_open_one_is_busy() -> None:
    app = _App()
    async with _door(app, max_connections=3) as door:
        busy: list[SocketStream] = []
        for _ in range(3):
            stream = await door.connect()
            await stream.send(_get("/slow", close=True))
            busy.append(stream)
        with anyio.fail_after(BOUND_S):
            for _ in busy:  # every busy request has reached the app
                await app.entered.receive()
        refused = await door.connect()
        answer = await _until_closed(refused)
        assert _status(answer) == 503
        problem = _problem(answer)
        assert (problem["code"], problem["detail"]) == (
            "too_many_connections",
            "too many open connections; retry shortly",
        )
        app.release.set()
        for stream in busy:
            assert _status(await _until_closed(stream)) == 200


async def test_refusals_are_logged_as_one_summary_line_per_period_not_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bastion.edge")
    app = _App()
    async with _door(app) as door:
        for _ in range(5):
            stream = await door.connect()
            await stream.send(_get("/healthz", b"X-Big: " + b"a" * edge.MAX_HEAD_BYTES))
            assert _status(await _until_closed(stream)) == 431
    lines = [r.getMessage() for r in caplog.records if r.name == "bastion.edge"]
    assert lines == ["connections refused at the door: 1 request head too large"]
