"""A minimal upstream for `bench/gateway.py`: the official SDK's low-level Server with one `echo` tool.

Run as ``python bench/echo_upstream.py PORT [DELAY_MS]`` (each call takes DELAY_MS first, default 0): uvicorn
(uvloop and httptools) on 127.0.0.1:PORT, the MCP endpoint at ``/mcp`` answering both eras (2026-07-28 single
POSTs and legacy sessions), the way a small real server would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any, Final

import anyio
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from raw_upstream import serve  # a sibling script, not a package
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

ECHO_SCHEMA: Final = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def build_app(delay_s: float = 0.0) -> Starlette:
    async def list_tools(_ctx: ServerRequestContext[Any, Any], _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[types.Tool(name="echo", description="Answers with the text it was given", input_schema=ECHO_SCHEMA)]
        )

    async def call_tool(_ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        text = str((params.arguments or {}).get("text", ""))
        if delay_s:
            await anyio.sleep(delay_s)
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    server: Server[Any] = Server("echo", version="1.0", on_list_tools=list_tools, on_call_tool=call_tool)
    manager = StreamableHTTPSessionManager(app=server)

    class Endpoint:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None, None]:
        async with manager.run():
            yield

    return Starlette(routes=[Route("/mcp", Endpoint(), methods=["GET", "POST", "DELETE"])], lifespan=lifespan)


if __name__ == "__main__":
    serve(build_app)
