"""Real MCP peers for data-plane tests: an in-process uvicorn server and a recording upstream."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from mcp.server.streamable_http import EventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send


class _Server(uvicorn.Server):
    """uvicorn with an event for "listening", so tests wait on it instead of polling."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int | None = None, *, http: Any = "auto") -> AsyncGenerator[str, None]:
    """Run ``app`` (lifespan included) on ``port`` or a free 127.0.0.1 port; yields the base URL; always stops.

    The socket is bound here and handed to uvicorn: no other process can take the port in between. ``http`` is
    uvicorn's HTTP protocol (`bastion serve` uses `web.edge.protocol`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    port = sock.getsockname()[1]
    # A long keep-alive: uvicorn's 5 s default races clients reusing a connection it is just closing.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=http,
        log_config=None,
        lifespan="on",
        access_log=False,
        timeout_keep_alive=120,
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


@dataclass(frozen=True)
class ToolCall:
    """One `tools/call` as the upstream received it: the tool, its arguments and the HTTP headers it came with."""

    name: str
    arguments: dict[str, Any]
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Recorder:
    """What the upstream saw: the Authorization header and all headers of every HTTP request, and every tool call."""

    authorizations: list[str | None] = field(default_factory=list[str | None])
    other_headers: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    tool_calls: list[ToolCall] = field(default_factory=list[ToolCall])
    # Every header line of every request, duplicates kept (a dict would hide a repeated Authorization).
    header_lines: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    # The `wait` tool signals `arrived` and holds the call until `release` is set.
    arrived: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)


def recording_upstream(recorder: Recorder) -> ASGIApp:
    """An MCP server (both eras) whose `whoami` tool answers with the credential the caller presented."""

    def auth_of(ctx: ServerRequestContext[Any, Any]) -> str:
        request = ctx.request
        return request.headers.get("authorization", "<none>") if request is not None else "<none>"

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(name="whoami", description="Who called", input_schema={"type": "object"}),
                types.Tool(
                    name="echo",
                    description="Echo text",
                    input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
                ),
                types.Tool(name="count", description="Reports progress", input_schema={"type": "object"}),
                types.Tool(name="hidden", description="Not provisioned", input_schema={"type": "object"}),
                types.Tool(name="wait", description="Holds the call until released", input_schema={"type": "object"}),
            ]
        )

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        request = ctx.request
        headers = {k.lower(): v for k, v in request.headers.items()} if request is not None else {}
        recorder.tool_calls.append(ToolCall(params.name, dict(params.arguments or {}), headers))
        if params.name == "whoami":
            return types.CallToolResult(content=[types.TextContent(type="text", text=auth_of(ctx))])
        if params.name == "echo":
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=str((params.arguments or {}).get("text")))]
            )
        if params.name == "count":
            for step in range(1, 4):
                await ctx.session.report_progress(step, 3, f"step {step}")
            return types.CallToolResult(content=[types.TextContent(type="text", text="counted")])
        if params.name == "wait":
            recorder.arrived.set()
            await recorder.release.wait()
            return types.CallToolResult(content=[types.TextContent(type="text", text="released")])
        if params.name == "hidden":
            return types.CallToolResult(content=[types.TextContent(type="text", text="should not be reachable")])
        return types.CallToolResult(content=[types.TextContent(type="text", text="unknown")], is_error=True)

    async def list_prompts(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(
            prompts=[
                types.Prompt(
                    name="greet", description="Greets", arguments=[types.PromptArgument(name="name", required=True)]
                )
            ]
        )

    async def get_prompt(_ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams) -> Any:
        who = (params.arguments or {}).get("name", "nobody")
        return types.GetPromptResult(
            messages=[types.PromptMessage(role="user", content=types.TextContent(type="text", text=f"Hello {who}"))]
        )

    async def list_resources(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(
            resources=[types.Resource(name="note", uri="mem://note", mime_type="text/plain")]
        )

    async def read_resource(ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> Any:
        if str(params.uri) != "mem://note":
            from mcp.shared.exceptions import MCPError

            raise MCPError(types.INVALID_PARAMS, "Resource not found", {"uri": str(params.uri)})
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri="mem://note", mime_type="text/plain", text=f"note for {auth_of(ctx)}")
            ]
        )

    server: Server[Any] = Server(
        "recording-upstream",
        version="1.0",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )
    app = mcp_app(server)

    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/mcp" and scope["method"] in ("GET", "POST", "DELETE"):
            lines = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
            recorder.header_lines.extend(lines)
            headers = dict(lines)
            recorder.authorizations.append(headers.get("authorization"))
            recorder.other_headers.append(headers)
        await app(scope, receive, send)

    return recorded


def mcp_app(server: Server[Any], event_store: EventStore | None = None) -> Starlette:
    """``server`` (the official SDK's low-level Server) at ``/mcp`` over Streamable HTTP, both eras.

    With ``event_store``, a stream the server closes can be resumed with GET and Last-Event-ID.
    """
    manager = (
        StreamableHTTPSessionManager(app=server)
        if event_store is None
        else StreamableHTTPSessionManager(app=server, event_store=event_store, retry_interval=10)
    )

    class Endpoint:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None, None]:
        async with manager.run():
            yield

    return Starlette(routes=[Route("/mcp", Endpoint(), methods=["GET", "POST", "DELETE"])], lifespan=lifespan)


@contextlib.asynccontextmanager
async def gateway_client(url: str, token: str, mode: str) -> AsyncGenerator[Client, None]:
    """The official SDK client talking to a Bastion gateway with a member's access token."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client,  # type: ignore[arg-type]
    ):
        yield client


@contextlib.contextmanager
def untraced() -> Generator[None]:
    """Coverage pauses in this thread while the block runs (the in-process gateway's event loop included).

    For a load phase that repeats, hundreds of times, code its first calls and other tests already cover: on
    Python 3.11, coverage's tracer makes the gateway's hot path ~2.5 times as slow, which a load test pays per call.
    """
    import coverage

    current = coverage.Coverage.current()
    if current is None:
        yield
        return
    current.stop()
    try:
        yield
    finally:
        current.start()
