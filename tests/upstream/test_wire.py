"""The fast path's HTTP/1.1 client: framing, keep-alive reuse, streaming, failures, and never sending a request twice.

Most peers are raw ``asyncio`` servers that write exact bytes (the malformed and edge cases a real server never
sends); one test runs a real uvicorn + Starlette app. Every server binds a free 127.0.0.1 port, records what it
saw, and ends by itself: each connection's script returns, and the server waits for the scripts on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bastion.net.addresses import IPAddress
from bastion.net.outbound import OutboundPolicy, UrlRefused
from bastion.upstream import wire
from bastion.upstream.wire import WireError, WirePool, WireResponse
from tests.mcp_support import serving

pytestmark = pytest.mark.anyio

LOOPBACK = OutboundPolicy(allow_loopback=True)
JSON_ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{}}'


# --- a raw upstream -------------------------------------------------------------------------------------------------


@dataclass
class Received:
    """One request as it came over the wire: request line, header lines (order and case kept), body."""

    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Conn:
    """One accepted connection, handed to a script; everything it reads is recorded on the upstream."""

    def __init__(self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.requests: list[Received] = []

    async def request(self) -> Received | None:
        """The next request, or None at a clean end of the connection (recorded as ``upstream.eof``)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b"", f"the connection ended inside a request head: {exc.partial!r}"
            self.upstream.eofs += 1
            self.upstream.eof.set()
            return None
        line, *lines = head[:-4].split(b"\r\n")
        headers = [(name, value.strip()) for name, _, value in (raw.partition(b":") for raw in lines)]
        lengths = [int(v) for k, v in headers if k.lower() == b"content-length"]
        body = await self.reader.readexactly(lengths[0] if lengths else 0)
        received = Received(line, headers, body)
        self.requests.append(received)
        self.upstream.requests.append(received)
        self.upstream.request_seen.set()
        return received

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Wait for the client to close (a request here would be a bug: the connection was not to be reused)."""
        assert await self.request() is None, "a request came over a connection that should not have been reused"


Script = Callable[[Conn], Awaitable[None]]


@dataclass
class Upstream:
    url: str
    connections: list[Conn] = field(default_factory=list[Conn])
    requests: list[Received] = field(default_factory=list[Received])
    eofs: int = 0
    eof: anyio.Event = field(default_factory=anyio.Event)
    request_seen: anyio.Event = field(default_factory=anyio.Event)

    async def next_eof(self) -> None:
        """Wait until some connection sees the client close it, then re-arm."""
        with anyio.fail_after(5):
            await self.eof.wait()
        self.eof = anyio.Event()


@contextlib.asynccontextmanager
async def upstream(script: Script, *, path: str = "/mcp") -> AsyncIterator[Upstream]:
    """A raw HTTP server on a free 127.0.0.1 port that runs ``script`` per connection, then closes it."""
    tasks: list[asyncio.Task[None]] = []
    failures: list[BaseException] = []
    state = Upstream(url="")

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        conn = Conn(state, reader, writer)
        state.connections.append(conn)
        try:
            await script(conn)
        except Exception as exc:  # noqa: BLE001  surfaced by the test below, not lost in a task
            failures.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()
        if tasks:
            with anyio.fail_after(5):
                await asyncio.wait(tasks)
    if failures:
        raise failures[0]


def answer(body: bytes = JSON_ANSWER, *, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


async def answer_all(conn: Conn) -> None:
    """Answer every request on the connection with the JSON answer until the client closes it."""
    while await conn.request() is not None:
        await conn.send(answer())


async def post(pool: WirePool, body: bytes = b"{}", *, first_byte_timeout_s: float = 5) -> WireResponse:
    return await pool.post([("content-type", "application/json")], body, first_byte_timeout_s=first_byte_timeout_s)


async def fetch(pool: WirePool, body: bytes = b"{}") -> tuple[WireResponse, bytes]:
    """One whole exchange: post, read the body, give the connection back."""
    with anyio.fail_after(5):
        response = await post(pool, body)
        try:
            return response, await response.read()
        finally:
            await response.aclose()


def pool_for(url: str, policy: OutboundPolicy = LOOPBACK, **kwargs: int) -> WirePool:
    return WirePool(url, policy, connect_timeout_s=5, **kwargs)


@asynccontextmanager
async def pooled(url: str, policy: OutboundPolicy = LOOPBACK, **kwargs: int) -> AsyncGenerator[WirePool]:
    """A pool for the test's upstream, closed however the test ends."""
    pool = pool_for(url, policy, **kwargs)
    try:
        yield pool
    finally:
        pool.close()


# --- answers and reuse ----------------------------------------------------------------------------------------------


async def test_a_json_answer_comes_back_whole_with_lower_cased_header_names_and_its_connection_carries_the_next() -> (
    None
):
    async with upstream(answer_all) as server:
        async with pooled(server.url) as pool:
            first, body = await fetch(pool, b'{"n":1}')
            assert first.status_code == 200
            assert first.headers == [(b"content-type", b"application/json"), (b"content-length", b"36")]
            assert body == JSON_ANSWER
            second, body = await fetch(pool, b'{"n":2}')
            assert (second.status_code, body) == (200, JSON_ANSWER)
            assert repr(pool) == f"WirePool({server.url.removesuffix('/mcp')}, idle=1)"
        await server.next_eof()
    assert len(server.connections) == 1
    assert [r.body for r in server.connections[0].requests] == [b'{"n":1}', b'{"n":2}']


async def test_a_chunked_event_stream_is_handed_over_chunk_by_chunk_while_the_server_is_still_writing() -> None:
    release = anyio.Event()

    async def stream(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\ndata: progress\n\n\r\n"
        )
        await release.wait()  # set only once the client has the first event
        await conn.send(b"e\r\ndata: result\n\n\r\n0\r\n\r\n")
        await answer_all(conn)  # the connection is kept: a chunked answer ends cleanly

    async with upstream(stream) as server:
        async with pooled(server.url) as pool:
            with anyio.fail_after(5):
                response = await post(pool)
                assert response.status_code == 200
                assert (b"content-type", b"text/event-stream") in response.headers
                chunks = response.chunks()
                assert await anext(chunks) == b"data: progress\n\n"
                release.set()
                assert [chunk async for chunk in chunks] == [b"data: result\n\n"]
                await response.aclose()
            _, body = await fetch(pool)
            assert body == JSON_ANSWER
        await server.next_eof()
    assert len(server.connections) == 1
    assert len(server.requests) == 2


async def test_a_real_uvicorn_upstream_streams_its_events_and_keeps_one_connection() -> None:
    release = anyio.Event()
    clients: list[tuple[str, int]] = []

    async def mcp(request: StarletteRequest) -> Response:
        assert request.client is not None
        clients.append((request.client.host, request.client.port))
        message = await request.json()
        if message["stream"]:

            async def events() -> AsyncIterator[bytes]:
                yield b"event: message\ndata: first\n\n"
                await release.wait()
                yield b"event: message\ndata: second\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"echo": message}, headers={"Mcp-Session": "S1"})

    app = Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])
    async with serving(app) as base, pooled(f"{base}/mcp") as pool:
        with anyio.fail_after(5):
            response = await post(pool, b'{"stream":true}')
            assert response.status_code == 200
            assert (b"transfer-encoding", b"chunked") in response.headers
            chunks = response.chunks()
            assert await anext(chunks) == b"event: message\ndata: first\n\n"
            release.set()
            assert b"".join([chunk async for chunk in chunks]) == b"event: message\ndata: second\n\n"
            await response.aclose()
        response, body = await fetch(pool, b'{"stream":false}')
        assert response.status_code == 200
        assert (b"mcp-session", b"S1") in response.headers
        assert body == b'{"echo":{"stream":false}}'
    assert len(clients) == 2
    assert clients[0] == clients[1]  # the same client port: one connection carried both requests


async def test_a_body_that_ends_with_the_connection_is_whole_and_that_connection_is_not_reused() -> None:
    async def close_delimited(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe whole ")
        await conn.send(b"body, then EOF")

    async with upstream(close_delimited) as server, pooled(server.url) as pool:
        for _ in range(2):
            response, body = await fetch(pool)
            assert (response.status_code, body) == (200, b"the whole body, then EOF")
    assert [len(c.requests) for c in server.connections] == [1, 1]


async def test_interim_1xx_answers_are_skipped_for_the_real_one() -> None:
    async def interim(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await conn.send(answer(b"final", extra=b"X-Final: yes\r\n"))
        await answer_all(conn)

    async with upstream(interim) as server:
        async with pooled(server.url) as pool:
            response, body = await fetch(pool)
            assert response.status_code == 200
            assert response.headers == [
                (b"content-type", b"application/json"),
                (b"content-length", b"5"),
                (b"x-final", b"yes"),
            ]
            assert body == b"final"
            _, body = await fetch(pool)
            assert body == JSON_ANSWER
        await server.next_eof()
    assert len(server.connections) == 1


async def test_an_answer_with_connection_close_is_not_followed_by_another_request_on_its_connection() -> None:
    async def closing(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(answer(extra=b"Connection: close\r\n"))
        await conn.until_eof()  # the server keeps it open: only the client's own choice can close it

    async with upstream(closing) as server, pooled(server.url) as pool:
        for _ in range(2):
            response, body = await fetch(pool)
            assert (response.status_code, body) == (200, JSON_ANSWER)
            await server.next_eof()
    assert [len(c.requests) for c in server.connections] == [1, 1]


async def test_an_answer_abandoned_before_its_end_closes_its_connection() -> None:
    async def first_unread(conn: Conn) -> None:
        if len(conn.upstream.connections) == 1:
            assert await conn.request() is not None
            await conn.send(answer(b"x" * 1000))
            await conn.until_eof()
        else:
            await answer_all(conn)

    async with upstream(first_unread) as server, pooled(server.url) as pool:
        with anyio.fail_after(5):
            response = await post(pool)
            await response.aclose()  # the body was never read
        await server.next_eof()
        _, body = await fetch(pool)
        assert body == JSON_ANSWER
    assert len(server.connections) == 2


async def test_an_idle_connection_older_than_the_keep_alive_window_is_closed_instead_of_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with upstream(answer_all) as server, pooled(server.url) as pool:
        await fetch(pool)
        monkeypatch.setattr(wire, "IDLE_KEEPALIVE_S", 0.0)  # every idle connection is now too old
        await fetch(pool)
        await server.next_eof()  # the stale one was closed, not left behind
        assert server.eofs == 1
    assert [len(c.requests) for c in server.connections] == [1, 1]


async def test_idle_connections_beyond_the_limit_are_closed() -> None:
    async with upstream(answer_all) as server, pooled(server.url, max_idle=1) as pool:
        with anyio.fail_after(5):
            both = [await post(pool), await post(pool)]  # the second cannot share the first's connection
            for response in both:
                assert await response.read() == JSON_ANSWER
                await response.aclose()
        await server.next_eof()
        assert server.eofs == 1
        await fetch(pool)
    assert sorted(len(c.requests) for c in server.connections) == [1, 2]


# --- failures -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(answer(b"x" * 100)[:-90], id="content-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nxxxxxxxxxx\r\n", id="chunked"),
    ],
)
async def test_a_connection_lost_mid_body_is_an_error_after_the_bytes_that_did_arrive(partial: bytes) -> None:
    async def cut(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(partial)

    async with upstream(cut) as server, pooled(server.url) as pool:
        with anyio.fail_after(5):
            response = await post(pool)
            assert response.status_code == 200
            received: list[bytes] = []
            with pytest.raises(WireError, match="closed the connection"):
                async for chunk in response.chunks():
                    received.append(chunk)  # noqa: PERF401  kept up to the error
            await response.aclose()
        assert b"".join(received) == b"x" * 10
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="half-a-head"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="only-an-interim-answer"),
    ],
)
async def test_a_connection_closed_before_the_whole_head_is_an_error_and_the_request_is_not_sent_again(
    partial: bytes,
) -> None:
    async def drop(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(partial)

    async with upstream(drop) as server, pooled(server.url) as pool:
        with anyio.fail_after(5), pytest.raises(WireError):
            await post(pool)
    assert len(server.connections) == 1
    assert len(server.requests) == 1


async def test_a_reused_connection_dropped_after_the_request_is_an_error_and_the_request_is_not_sent_again() -> None:
    async def drop_second(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(answer())
        assert await conn.request() is not None  # read, then gone without a word

    async with upstream(drop_second) as server, pooled(server.url) as pool:
        await fetch(pool)
        with anyio.fail_after(5), pytest.raises(WireError, match="before answering"):
            await post(pool, b'{"n":2}')
    assert len(server.connections) == 1  # no second connection: nothing was retried
    assert [r.body for r in server.requests] == [b"{}", b'{"n":2}']


async def test_a_kept_connection_the_server_closed_while_idle_is_not_used_and_nothing_is_sent_twice() -> None:
    async def close_when_idle(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(answer())
        if len(conn.upstream.connections) == 1:
            # Half-close, then wait for the client's own close: it comes only once the client has seen the EOF.
            conn.writer.write_eof()
            await conn.until_eof()
        else:
            await answer_all(conn)

    async with upstream(close_when_idle) as server, pooled(server.url) as pool:
        await fetch(pool)
        await server.next_eof()
        _, body = await fetch(pool, b'{"n":2}')
        assert body == JSON_ANSWER
    assert [[r.body for r in c.requests] for c in server.connections] == [[b"{}"], [b'{"n":2}']]


@pytest.mark.parametrize(
    "unasked", [pytest.param(answer(b"unasked"), id="an-answer"), pytest.param(b"\r\n", id="a-blank-line")]
)
async def test_bytes_arriving_on_an_idle_connection_make_it_unusable(unasked: bytes) -> None:
    released = anyio.Event()

    async def chatter(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(answer())
        if len(conn.upstream.connections) == 1:
            await released.wait()
            await conn.send(unasked)
            await conn.until_eof()
        else:
            await answer_all(conn)

    async with upstream(chatter) as server, pooled(server.url) as pool:
        await fetch(pool)
        released.set()
        await server.next_eof()
        _, body = await fetch(pool)
        assert body == JSON_ANSWER
    assert [len(c.requests) for c in server.connections] == [1, 1]


@pytest.mark.parametrize(
    "trailing",
    [
        pytest.param(answer(b"second answer"), id="a-second-answer"),
        pytest.param(b"garbage", id="garbage"),
    ],
)
@pytest.mark.parametrize("connection", [b"", b"Connection: close\r\n"], ids=["keep-alive", "close"])
async def test_bytes_after_a_whole_answer_neither_join_it_nor_spoil_it_and_the_connection_is_dropped(
    trailing: bytes, connection: bytes
) -> None:
    async def overlong(conn: Conn) -> None:
        if len(conn.upstream.connections) == 1:
            assert await conn.request() is not None
            await conn.send(answer(b"first answer", extra=connection) + trailing)  # one write: one segment
            await conn.until_eof()
        else:
            await answer_all(conn)

    async with upstream(overlong) as server, pooled(server.url) as pool:
        response, body = await fetch(pool)
        assert body == b"first answer"
        assert [k for k, _ in response.headers].count(b"content-length") == 1
        await server.next_eof()
        _, body = await fetch(pool)
        assert body == JSON_ANSWER
    assert [len(c.requests) for c in server.connections] == [1, 1]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 2OO OK\r\n\r\n", id="letters-in-the-status"),
        pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi", id="two-lengths"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", id="header-without-colon"),
    ],
)
async def test_a_malformed_answer_is_an_error_and_its_connection_is_closed(head: bytes) -> None:
    async def malformed(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(head)
        await conn.until_eof()

    async with upstream(malformed) as server, pooled(server.url) as pool:
        with anyio.fail_after(5), pytest.raises(WireError, match="malformed"):
            await post(pool)
        await server.next_eof()
    assert len(server.requests) == 1


async def test_a_refused_connection_is_a_wire_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:  # bound, never listening: connects are refused
        bound.bind(("127.0.0.1", 0))
        async with pooled(f"http://127.0.0.1:{bound.getsockname()[1]}/mcp") as pool:
            with anyio.fail_after(5), pytest.raises(WireError, match="cannot connect"):
                await post(pool)


async def test_connecting_for_longer_than_the_connect_timeout_is_a_wire_error() -> None:
    never = anyio.Event()

    async def hanging(_host: str, _port: int) -> list[IPAddress]:
        await never.wait()
        raise AssertionError("unreachable")

    pool = WirePool(
        "http://localhost:9/mcp", OutboundPolicy(allow_loopback=True, resolver=hanging), connect_timeout_s=0.05
    )
    try:
        with anyio.fail_after(5), pytest.raises(WireError, match="timed out"):
            await post(pool)
    finally:
        pool.close()


async def test_no_head_within_the_first_byte_timeout_is_a_timeout_and_that_connection_is_closed() -> None:
    async def silent_first(conn: Conn) -> None:
        if len(conn.upstream.connections) == 1:
            assert await conn.request() is not None
            await conn.until_eof()  # never answers; the client gives up and closes
        else:
            await answer_all(conn)

    async with upstream(silent_first) as server, pooled(server.url) as pool:
        with anyio.fail_after(5), pytest.raises(TimeoutError):
            await post(pool, first_byte_timeout_s=0.05)
        await server.next_eof()
        _, body = await fetch(pool)
        assert body == JSON_ANSWER
    assert [len(c.requests) for c in server.connections] == [1, 1]


async def test_a_closed_pool_refuses_to_post() -> None:
    async with upstream(answer_all) as server:
        pool = pool_for(server.url)
        pool.close()
        with pytest.raises(WireError, match="closed"):
            await post(pool)
    assert server.connections == []


# --- the outbound policy --------------------------------------------------------------------------------------------


async def test_a_loopback_url_is_refused_unless_the_policy_allows_loopback() -> None:
    with pytest.raises(UrlRefused):
        WirePool("http://127.0.0.1:9/mcp", OutboundPolicy(), connect_timeout_s=5)
    with pytest.raises(UrlRefused):
        WirePool("https://localhost:9/mcp", OutboundPolicy(), connect_timeout_s=5)


async def test_a_name_that_resolves_to_loopback_is_refused_at_post_without_connecting() -> None:
    async def to_loopback(_host: str, _port: int) -> list[IPAddress]:
        return [ip_address("127.0.0.1")]

    async with upstream(answer_all) as server:
        port = server.url.split(":")[2].split("/")[0]
        async with pooled(f"https://upstream.example:{port}/mcp", OutboundPolicy(resolver=to_loopback)) as pool:
            with anyio.fail_after(5), pytest.raises(UrlRefused) as refused:
                await post(pool)
            assert refused.value.rule == "loopback"
    assert server.connections == []


# --- what goes out --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 16383, 16384, 40_000], ids=lambda n: f"{n}-bytes")
async def test_the_request_is_sent_exactly_as_given_with_its_host_and_length_and_nothing_else(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    async with upstream(answer_all, path="/mcp/v1?tenant=a%20b") as server, pooled(server.url) as pool:
        with anyio.fail_after(5):
            response = await pool.post(
                [("user-agent", "bastion/test"), ("authorization", "Bearer member-token"), ("mcp-name", "echo")],
                body,
                first_byte_timeout_s=5,
            )
            await response.read()
            await response.aclose()
    port = server.url.split(":")[2].split("/")[0]
    [received] = server.requests
    assert received.line == b"POST /mcp/v1?tenant=a%20b HTTP/1.1"
    assert received.headers == [
        (b"host", f"127.0.0.1:{port}".encode()),
        (b"user-agent", b"bastion/test"),
        (b"authorization", b"Bearer member-token"),
        (b"mcp-name", b"echo"),
        (b"content-length", str(size).encode()),
    ]
    assert received.body == body


async def test_a_host_name_goes_in_the_host_header_while_the_connection_goes_to_the_checked_address() -> None:
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[IPAddress]:
        asked.append((host, port))
        return [ip_address("127.0.0.1")]

    async with upstream(answer_all, path="/") as server:
        port = int(server.url.split(":")[2].split("/")[0])
        async with pooled(f"http://localhost:{port}", OutboundPolicy(allow_loopback=True, resolver=resolver)) as pool:
            await fetch(pool)
    [received] = server.requests
    assert received.line == b"POST / HTTP/1.1"
    assert received.headers[0] == (b"host", f"localhost:{port}".encode())
    assert asked == [("localhost", port)]


# --- streaming volume -----------------------------------------------------------------------------------------------


async def test_a_large_answer_pauses_the_upstream_while_unread_and_arrives_whole_and_in_order() -> None:
    size = 3 * 1024 * 1024
    payload = b"".join(i.to_bytes(4, "big") for i in range(size // 4))

    async def big(conn: Conn) -> None:
        assert await conn.request() is not None
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n" + payload)
        await answer_all(conn)

    async with upstream(big) as server, pooled(server.url) as pool:
        with anyio.fail_after(10):
            response = await post(pool)
            transport = response._connection.transport  # pyright: ignore[reportPrivateUsage]
            assert transport is not None
            while transport.is_reading():  # nobody reads: the client stops taking bytes from the socket
                await anyio.lowlevel.checkpoint()
            buffered = response._connection.buffered  # pyright: ignore[reportPrivateUsage]
            assert wire.HIGH_WATER_BYTES < buffered < size
            body = await response.read()
            assert transport.is_reading()
            await response.aclose()
        assert len(body) == size
        assert body == payload
        _, after = await fetch(pool)  # the connection is whole afterwards
        assert after == JSON_ANSWER
    assert len(server.connections) == 1


# --- closing --------------------------------------------------------------------------------------------------------


async def test_closing_the_pool_closes_its_idle_connections_and_one_still_in_use_when_it_comes_back() -> None:
    async with upstream(answer_all) as server:
        pool = pool_for(server.url)
        with anyio.fail_after(5):
            idle, in_use = await post(pool), await post(pool)  # two connections
            assert await idle.read() == JSON_ANSWER
            await idle.aclose()
        pool.close()
        await server.next_eof()  # the idle one
        assert server.eofs == 1
        assert await in_use.read() == JSON_ANSWER
        await in_use.aclose()
        await server.next_eof()  # the one that came back after the pool closed
    assert server.eofs == 2
    assert len(server.connections) == 2
