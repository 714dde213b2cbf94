"""The default upstream of `bench/gateway.py`: one `echo` tool answered by a bare ASGI app, so that the upstream is
never what a benchmark measures.

Run as ``python bench/raw_upstream.py PORT [DELAY_MS]``: uvicorn (uvloop and httptools) on 127.0.0.1:PORT with the
MCP endpoint at ``/mcp``. It answers just what a client of either era sends for one tool: ``server/discover`` and
2026-07-28 single POSTs, the 2025-11-25 ``initialize`` handshake (a session id per handshake, checked on later
requests), ``tools/list``, ``tools/call`` and ``ping``, each as one JSON body. No SDK, no validation beyond what a
request needs to be answered, so a call costs it a few tens of microseconds: the SDK-based upstream
(`bench/echo_upstream.py`, `--upstream sdk`) saturates one core at ~1,500 calls a second on a small machine, well
below what Bastion relays.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable
from typing import Any, Final

import anyio
import uvicorn
from starlette.types import Receive, Scope, Send

MODERN: Final = "2026-07-28"
HANDSHAKE: Final = ("2025-11-25", "2025-06-18", "2025-03-26")
ECHO_SCHEMA: Final = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
SERVER_INFO: Final = {"name": "echo", "version": "1.0"}
CAPABILITIES: Final = {"tools": {"listChanged": False}}
_JSON: Final = [(b"content-type", b"application/json")]
MAX_SESSIONS: Final = 100_000
_CACHEABLE: Final = frozenset({"server/discover", "tools/list"})  # 2026-07-28 results that say how long they hold


class RawEcho:
    """The ASGI app: ``delay_s`` is how long each `tools/call` takes before it answers."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self._delay_s = delay_s
        self._sessions: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http" or scope["path"] != "/mcp":
            await _reply(send, 404, b"")
            return
        if scope["method"] == "DELETE":
            self._sessions.discard(_header(scope, b"mcp-session-id") or b"")
            await _reply(send, 200, b"")
            return
        if scope["method"] != "POST":
            await _reply(send, 405, b"")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await self._post(scope, bytes(body), send)

    async def _post(self, scope: Scope, body: bytes, send: Send) -> None:
        try:
            request: Any = json.loads(body)
        except ValueError:
            await _error(send, None, -32700, "Parse error", status=400)
            return
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            await _reply(send, 202, b"")  # a response or something else with nothing to answer
            return
        fields: dict[str, Any] = request  # pyright: ignore[reportUnknownVariableType]
        method: str = fields["method"]
        if "id" not in fields:
            await _reply(send, 202, b"")  # a notification
            return
        request_id = fields["id"]
        params: Any = fields.get("params") or {}
        version = (_header(scope, b"mcp-protocol-version") or b"").decode("latin-1")
        modern = version == MODERN or method == "server/discover"
        extra: list[tuple[bytes, bytes]] = []
        if method == "initialize":
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            session = secrets.token_hex(16).encode()
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions.clear()
            self._sessions.add(session)
            extra.append((b"mcp-session-id", session))
            result: dict[str, Any] = {
                "protocolVersion": asked if asked in HANDSHAKE else HANDSHAKE[0],
                "capabilities": CAPABILITIES,
                "serverInfo": SERVER_INFO,
            }
        elif not modern and _header(scope, b"mcp-session-id") not in self._sessions:
            await _error(send, request_id, -32600, "Bad Request: unknown or missing session", status=404)
            return
        elif method == "server/discover":
            result = {
                "supportedVersions": [MODERN],
                "capabilities": CAPABILITIES,
                "_meta": {"io.modelcontextprotocol/serverInfo": SERVER_INFO},
            }
        elif method == "tools/list":
            result = {
                "tools": [
                    {"name": "echo", "description": "Answers with the text it was given", "inputSchema": ECHO_SCHEMA}
                ]
            }
        elif method == "tools/call":
            arguments = params.get("arguments") if isinstance(params, dict) else None
            text = str(arguments.get("text", "")) if isinstance(arguments, dict) else ""
            if self._delay_s:
                await anyio.sleep(self._delay_s)
            result = {"content": [{"type": "text", "text": text}], "isError": False}
        elif method == "ping":
            result = {}
        else:
            await _error(send, request_id, -32601, f"Method not found: {method}")
            return
        if modern and method != "ping":
            result["resultType"] = "complete"
            if method in _CACHEABLE:
                result |= {"cacheScope": "private", "ttlMs": 0}
        raw = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}, separators=(",", ":")).encode()
        await _reply(send, 200, raw, [*_JSON, *extra])


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [*(headers or []), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, request_id: Any, code: int, message: str, status: int = 200) -> None:
    raw = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}).encode()
    await _reply(send, status, raw, _JSON)


def serve(build: Callable[[float], Any]) -> None:
    """Serve the app ``build(delay_s)`` makes as ``python SCRIPT PORT [DELAY_MS]`` asks: uvicorn with uvloop and
    httptools on 127.0.0.1 (both echo upstreams run this way)."""
    port = int(sys.argv[1])
    delay_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    uvicorn.run(
        build(delay_ms / 1000),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    serve(RawEcho)
