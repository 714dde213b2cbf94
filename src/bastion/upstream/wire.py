"""A lean HTTP/1.1 client for the fast path: keep-alive connections to one upstream origin, parsed by httptools.

httpx2 costs more CPU per request than everything else the fast path does (URL merging, auth and redirect
layers, h11 in pure Python); this does only what forwarding a POST needs. Connections are opened to an
address the outbound policy checked (DNS pinning, as ``OutboundPolicy.client()`` does); TLS still verifies
the host name. A request is never sent twice: a reused connection that fails before answering is an error for
the caller, not a retry, and idle connections are dropped before a typical server's keep-alive timeout so
that race is rare.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Final
from urllib.parse import urlsplit

import httptools  # pyright: ignore[reportMissingTypeStubs]

from bastion.net.outbound import OutboundPolicy

# Under the 5 s keep-alive uvicorn, gunicorn and Node default to: we drop a connection before the server does.
IDLE_KEEPALIVE_S: Final = 4.0
MAX_IDLE_CONNECTIONS: Final = 64
HIGH_WATER_BYTES: Final = 1024 * 1024  # stop reading from the upstream while this much is unread by the caller
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BREAK: Final = re.compile(r"[\r\n\x00]")


class WireError(OSError):
    """The upstream could not be reached, or the connection failed before a whole answer came back."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)  # pyright: ignore[reportUnknownMemberType]
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = asyncio.Event()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.wakeup = asyncio.Event()
        self.in_flight = False

    # --- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:  # bytes nobody asked for: this connection cannot be trusted with the next request
            self._close()
            return
        try:
            self._parser.feed_data(data)  # pyright: ignore[reportUnknownMemberType]
        except httptools.HttpParserError as exc:  # pyright: ignore[reportUnknownMemberType]
            if not self.complete:  # bytes after a whole answer spoil the connection, not the answer
                self.error = WireError(f"the upstream sent a malformed HTTP response: {exc}")
            self._close()
        self.wakeup.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_flight and not self.complete:
            if exc is None and self.headers_done.is_set() and not self._framed():
                self.complete = True  # a body delimited by the end of the connection
            elif self.error is None:
                self.error = WireError("the upstream closed the connection before answering in full")
        self.headers_done.set()
        self.wakeup.set()

    # --- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request must not join the first: stop parsing here
            raise WireError("the upstream sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()  # pyright: ignore[reportUnknownMemberType]
        if self.status < 200:  # an interim 1xx answer: the real one follows
            self.headers = []
            return
        self.headers_done.set()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER_BYTES and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.complete = True
        self.keep_alive = bool(self._parser.should_keep_alive())  # pyright: ignore[reportUnknownMemberType]

    # --- used by the pool ---------------------------------------------------------------------------------------

    def _framed(self) -> bool:
        return any(name in (b"content-length", b"transfer-encoding") for name, _ in self.headers)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def usable(self, now: float) -> bool:
        return not self.closed and self.transport is not None and now - self.idle_since < IDLE_KEEPALIVE_S

    def send(self, head: bytes, body: bytes) -> None:
        if self.closed or self.transport is None:  # the peer hung up between connecting (or idling) and now
            raise WireError("the upstream closed the connection before the request was sent")
        self._reset()
        self.in_flight = True
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end.

        Raises:
            WireError: the connection failed mid-body.
        """
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= HIGH_WATER_BYTES // 2 and self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                return chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            if self.closed:
                raise WireError("the upstream closed the connection mid-answer")
            self.wakeup.clear()
            await self.wakeup.wait()


class WireResponse:
    """An upstream answer whose body is read as it arrives; ``aclose()`` returns the connection for reuse."""

    def __init__(self, pool: WirePool, connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self.status_code = connection.status
        self.headers = connection.headers
        self._done = False
        self._released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            if chunk:
                yield chunk

    async def next_chunk(self) -> bytes | None:
        """The next part of the body as it arrives (possibly empty), or None once it is complete."""
        chunk = await self._connection.next_chunk()
        if chunk is None:
            self._done = True
        return chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        if self._released:
            return  # closing twice must not give the connection back twice
        self._released = True
        connection = self._connection
        connection.in_flight = False
        if self._done and connection.complete and connection.keep_alive and not connection.closed:
            self._pool.release(connection)
        else:
            connection._close()  # pyright: ignore[reportPrivateUsage]


class WirePool:
    """Keep-alive HTTP/1.1 connections to the origin of ``url``, each to an address ``policy`` allowed."""

    def __init__(
        self,
        url: str,
        policy: OutboundPolicy,
        *,
        connect_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = MAX_IDLE_CONNECTIONS,
    ) -> None:
        policy.check_url(url)
        parts = urlsplit(url)
        self._policy = policy
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = parts.port is None or parts.port == _DEFAULT_PORTS[parts.scheme]
        host_header = f"[{self._host}]" if ":" in self._host else self._host
        self._authority = (host_header if default_port else f"{host_header}:{self._port}").encode("idna")
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._closed = False

    def __repr__(self) -> str:
        return f"WirePool({self._scheme}://{self._host}:{self._port}, idle={len(self._idle)})"

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                addresses = await self._policy.resolve(self._host, self._port)
                failure: OSError | None = None
                for address in addresses:
                    try:
                        _transport, connection = await loop.create_connection(
                            _Connection,
                            str(address),
                            self._port,
                            ssl=self._ssl,
                            server_hostname=self._host if self._ssl is not None else None,
                        )
                        return connection
                    except OSError as exc:
                        failure = exc
                raise WireError(f"cannot connect to {self._host}:{self._port}: {failure}")
        except TimeoutError:
            raise WireError(f"connecting to {self._host}:{self._port} timed out") from None

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(now):
                return connection
            connection._close()  # pyright: ignore[reportPrivateUsage]
        return None

    def release(self, connection: _Connection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            connection._close()  # pyright: ignore[reportPrivateUsage]
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def post(
        self, headers: Sequence[tuple[str, str]], body: bytes, *, first_byte_timeout_s: float
    ) -> WireResponse:
        """Send ``body`` to the pool's URL and wait for the status line and headers.

        Raises:
            WireError: the upstream could not be reached or failed before its headers (nothing is retried).
            UrlRefused: the outbound policy refuses the host's address.
            TimeoutError: no headers within ``first_byte_timeout_s``.
        """
        return await self._send(b"POST ", headers, body, first_byte_timeout_s)

    async def get(self, headers: Sequence[tuple[str, str]], *, first_byte_timeout_s: float) -> WireResponse:
        """A GET of the pool's URL (an event stream resumed with ``Last-Event-ID``); raises as ``post`` does."""
        return await self._send(b"GET ", headers, None, first_byte_timeout_s)

    async def _send(
        self, method: bytes, headers: Sequence[tuple[str, str]], body: bytes | None, first_byte_timeout_s: float
    ) -> WireResponse:
        if self._closed:
            raise WireError("the upstream client was closed")
        lines = [method, self._target.encode("ascii"), b" HTTP/1.1\r\nhost: ", self._authority, b"\r\n"]
        for name, value in headers:
            # Values come from credentials (an authorization server's token) and from the agent (the tool name):
            # a line break would let either write headers, or a second request, onto a shared connection.
            if not _TOKEN.fullmatch(name) or _BREAK.search(value):
                raise WireError(f"refused to send header {name!r}: not a header name, or a line break in its value")
            try:
                lines += [name.encode("ascii"), b": ", value.encode("latin-1"), b"\r\n"]
            except UnicodeEncodeError:
                raise WireError(f"header {name!r} has characters HTTP/1.1 cannot carry") from None
        if body is not None:
            lines += [b"content-length: ", str(len(body)).encode("ascii"), b"\r\n"]
        lines.append(b"\r\n")
        connection = self._take() or await self._connect()
        connection.send(b"".join(lines), body or b"")
        try:
            async with asyncio.timeout(first_byte_timeout_s):
                await connection.headers_done.wait()
        except BaseException:
            connection._close()  # pyright: ignore[reportPrivateUsage]
            raise
        if connection.error is not None or connection.status == 0:
            connection._close()  # pyright: ignore[reportPrivateUsage]
            raise connection.error or WireError("the upstream closed the connection before answering")
        return WireResponse(self, connection)

    def close(self) -> None:
        """Close idle connections now; those in use close when their answer is done."""
        self._closed = True
        for connection in self._idle:
            connection._close()  # pyright: ignore[reportPrivateUsage]
        self._idle.clear()
