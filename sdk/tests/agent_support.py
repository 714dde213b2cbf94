"""Helpers for the SDK's tests: events as Bastion sends them, signed deliveries, and a real server on a free port."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import uvicorn
from starlette.types import ASGIApp

from bastion_agent import sign


def new_secret(size: int = 32) -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def event_body(
    kind: str,
    *,
    version: int,
    connection_id: str | None = "conn-1",
    member: tuple[str, str] | None = ("mem-ada", "ada@example.com"),
    host: str = "agent",
    gateway: str | None = "sales",
    token: str | None = None,
    token_id: str | None = None,
    claim_code: str | None = None,
    event_id: str | None = None,
    **extra: str | None,
) -> bytes:
    """The JSON body of one event, in the wire format of Bastion's webhooks."""
    data: dict[str, Any] = {
        "event_id": event_id or secrets.token_hex(8),
        "host": host,
        "gateway": gateway,
        "connection_id": connection_id,
        "version": version,
        "member": {"id": member[0], "email": member[1]} if member else None,
        "token": token,
        "token_id": token_id,
        "claim_code": claim_code,
        "claim_expires_at": "2030-01-01T00:00:00Z" if claim_code else None,
        "mcp_url": f"http://bastion.test/g/{gateway}/mcp" if gateway else None,
        **extra,
    }
    return json.dumps({"type": kind, "timestamp": "2026-01-01T00:00:00Z", "data": data}).encode("utf-8")


def signed_headers(body: bytes, *secrets_: str, webhook_id: str | None = None, at: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, one v1 signature per secret."""
    webhook_id = webhook_id or "msg_" + json.loads(body)["data"]["event_id"]
    at = int(time.time()) if at is None else at
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(at),
        "webhook-signature": " ".join(sign(s, webhook_id, at, body) for s in secrets_),
        "content-type": "application/json",
    }


def closed_port() -> int:
    """A 127.0.0.1 port that nothing listened on a moment ago (for a peer that must be unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int | None = None) -> AsyncGenerator[str]:
    """Run ``app`` on 127.0.0.1 (a free port unless given); yields the base URL; always stops.

    The socket is bound here and handed to uvicorn, so no other test (or xdist worker) can take the port
    between choosing it and listening on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", access_log=False, timeout_keep_alive=120
    )
    server = _Server(config)
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(60):  # an upper bound only (a loaded machine starts slowly)
                await server.ready.wait()
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
