"""Pure ASGI middleware: request ids, one access log line per request, and a body-size cap."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.web.logs import request_id_var

logger = logging.getLogger("bastion.http")
REQUEST_ID_HEADER: Final = b"x-request-id"
_CLIENT_REQUEST_ID: Final = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
# Enrollment links, invitations and reset links carry their secret in the path (`/enroll/bsl_…`): never log it.
_SECRET_IN_PATH: Final = re.compile(r"(bs[a-z]_)[A-Za-z0-9]{8,}")


class RequestContext:
    """Gives every request an id (the caller's if well formed), echoes it, and logs the outcome."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(REQUEST_ID_HEADER)
        request_id = (
            supplied.decode("ascii") if supplied and _CLIENT_REQUEST_ID.fullmatch(supplied) else secrets.token_hex(8)
        )
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode("ascii"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": _SECRET_IN_PATH.sub(r"\1…", scope["path"]),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            request_id_var.reset(token)


class BodyLimit:
    """Refuses bodies over the limit before the app runs: by Content-Length, or by reading a body of unknown length
    (chunked) in full first, within the limit, and handing it to the app as one message.

    A body the HTTP parser has framed by Content-Length cannot outgrow it; a chunked one is read here, so an app
    never starts reading a body that is then cut off (and never reports that as a client disconnect).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was whole: nobody to answer
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, max_bytes: int) -> None:
    from bastion.web.problems import problem_bytes

    body = problem_bytes(413, "payload_too_large", "Payload too large", f"the body exceeds {max_bytes} bytes")
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
