"""A real webhook receiver for tests: records every request, verifies it with the official `standardwebhooks`
package against the secrets it is told, and answers as scripted (a status, or a redirect it never follows up on).
Serve it with ``tests.mcp_support.serving(receiver.app())``, or ``in_thread`` beside synchronous code (the CLI)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.processes import free_port

PATH = "/hook"


@dataclass(frozen=True)
class Received:
    """One request as the receiver got it, and which of its secrets verified it (by index; empty: none)."""

    body: bytes
    headers: dict[str, str]
    verified_by: tuple[int, ...]

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.event["data"]
        return data

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


def verify(secret: str, received: Received) -> Any:
    """What the official verifier makes of ``received`` now (raises WebhookVerificationError if it refuses)."""
    return Webhook(secret).verify(received.body, received.headers)


@dataclass
class Receiver:
    secrets: list[str] = field(default_factory=list[str])
    status: int = 204
    redirect_to: str | None = None
    received: list[Received] = field(default_factory=list[Received])
    followed: int = 0  # requests to the redirect's target: a sender that follows redirects would show here
    _waiters: list[anyio.Event] = field(default_factory=list[anyio.Event])

    async def wait_for(self, count: int) -> list[Received]:
        """Until ``count`` requests have arrived (bound it with ``anyio.fail_after``); the receiver's own loop only."""
        while len(self.received) < count:
            arrived = anyio.Event()
            self._waiters.append(arrived)
            await arrived.wait()
        return self.received[:count]

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            verified: list[int] = []
            for n, secret in enumerate(self.secrets):
                try:
                    Webhook(secret).verify(body, headers)
                except WebhookVerificationError:
                    continue
                verified.append(n)
            self.received.append(Received(body, headers, tuple(verified)))
            waiting, self._waiters = self._waiters, []
            for arrived in waiting:
                arrived.set()
            if self.redirect_to is not None:
                return Response(status_code=302, headers={"Location": self.redirect_to})
            return Response(status_code=self.status)

        async def elsewhere(_request: Request) -> Response:
            self.followed += 1
            return Response(status_code=200)

        return Starlette(routes=[Route(PATH, hook, methods=["POST"]), Route("/elsewhere", elsewhere, methods=["POST"])])


@contextmanager
def in_thread(receiver: Receiver) -> Iterator[str]:
    """Serve ``receiver`` from a thread of its own (for callers that run their own event loop); always stops."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(receiver.app(), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx2.Client(timeout=1.0) as client:
            for _ in range(200):
                try:
                    client.get(f"http://127.0.0.1:{port}/")
                    break
                except httpx2.TransportError:
                    if not thread.is_alive():
                        raise AssertionError("the receiver did not start") from None
                    thread.join(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
