"""The handshake-era hot path: a 2025-era session's tools/call is posted into the pooled upstream session.

A call proves which path served it by the request id the upstream saw: Bastion's own ``bastion-N`` (a string) on
the hot path, the SDK client's integer id on the full path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import httpx2
import mcp_types as types
import pytest
import sqlalchemy as sa
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from mcp.server.connection import Connection
from mcp.server.streamable_http import EventStore
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import bastion.web.app as web_app
from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.connections import Principal
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Provisioning, ProvisionMode, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.web.mcp.sessions import Handshakes
from tests.fixtures.event_store import MemoryEventStore
from tests.mcp_support import mcp_app, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
CREDENTIAL = "ada-calc-credential"
HANDSHAKE_VERSION = "2025-11-25"
# `poll`, `change`: see `upstream_app`; `bad` and `split` are answered by hand (`answering`).
TOOLS = ("add", "secret", "slow", "ping", "sample", "fine", "fail", "boom", "poll", "change", "bad", "split")


@dataclass(frozen=True)
class Seen:
    """One tools/call as the upstream's handler saw it."""

    tool: str
    arguments: dict[str, Any]
    request_id: Any
    session_id: str | None
    authorization: str | None
    progress_token: Any = None  # the `_meta.progressToken` of the request

    @property
    def hot(self) -> bool:
        """Posted by the hot path: the request id is Bastion's own, not the SDK client's integer."""
        return isinstance(self.request_id, str) and self.request_id.startswith("bastion-")


@dataclass
class Upstream:
    """What the upstream saw, and events its slow tool signals."""

    calls: list[Seen] = field(default_factory=list[Seen])
    header_lines: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    started: anyio.Event = field(default_factory=anyio.Event)
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    # The Last-Event-ID of every GET that resumed a stream.
    resumed_from: list[str] = field(default_factory=list[str])
    # Every chunk of every response body the upstream sent.
    sent: list[bytes] = field(default_factory=list[bytes])
    _sent_more: anyio.Event = field(default_factory=anyio.Event)

    def of(self, tool: str) -> list[Seen]:
        return [seen for seen in self.calls if seen.tool == tool]

    def sending(self, body: bytes) -> None:
        self.sent.append(body)
        self._sent_more.set()

    async def until_sent(self, part: bytes, after: int) -> None:
        """Until a chunk sent after the first ``after`` ones holds ``part``."""
        with anyio.fail_after(5):
            while not [body for body in self.sent[after:] if part in body]:
                self._sent_more = anyio.Event()
                await self._sent_more.wait()


def upstream_app(up: Upstream, event_store: EventStore | None = None) -> ASGIApp:
    """A handshake-era MCP server (the SDK's low-level Server) whose tools record how they were called.

    With ``event_store`` its streams can be resumed, and `poll` closes its call's stream before it answers.
    """

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        schema_ = {"type": "object", "properties": {"n": {"type": "integer"}}}
        return types.ListToolsResult(tools=[types.Tool(name=n, description=n, input_schema=schema_) for n in TOOLS])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        headers: dict[str, str] = dict(ctx.request.headers) if ctx.request is not None else {}
        arguments = dict(params.arguments or {})
        progress_token = (params.meta or {}).get("progress_token")
        up.calls.append(
            Seen(
                params.name,
                arguments,
                ctx.request_id,
                headers.get("mcp-session-id"),
                headers.get("authorization"),
                progress_token,
            )
        )
        related = ServerMessageMetadata(related_request_id=ctx.request_id)
        text = "done"
        if params.name == "add":
            for step in (1, 2):
                await ctx.session.report_progress(step, 2)
            text = str(int(arguments.get("n", 0)) + 1)
        elif params.name == "slow":
            up.started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                up.cancelled.set()
                raise
        elif params.name == "ping":
            await ctx.session.send_request(types.PingRequest(), types.EmptyResult, metadata=related)
            text = "pong"
        elif params.name == "sample":
            message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text="hi"))
            request = types.CreateMessageRequest(
                params=types.CreateMessageRequestParams(messages=[message], max_tokens=1)
            )
            try:
                await ctx.session.send_request(request, types.CreateMessageResult, metadata=related)
            except MCPError as exc:
                text = str(exc.code)
        elif params.name == "boom":
            raise MCPError(-32099, "the upstream gave up")
        elif params.name == "poll":
            # 2025-11-25 polling: the call's stream ends early; the rest waits in the event store for a resume.
            if ctx.close_sse_stream is None:
                raise MCPError(-32099, "this stream cannot be resumed")
            sent = len(up.sent)
            await ctx.session.report_progress(1, 2)
            # Closed once the progress is on the wire (the call must ask for progress): the caller has an event id
            # to resume from by then.
            await up.until_sent(b"notifications/progress", after=sent)
            await ctx.close_sse_stream()
            await ctx.session.report_progress(2, 2)
            text = "polled"
        elif params.name == "change":
            # On the call's own stream, not the session's GET stream.
            await ctx.session.send_notification(types.ToolListChangedNotification(), related_request_id=ctx.request_id)
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=params.name == "fail")

    server: Server[Any] = Server("handshake-upstream", version="1", on_list_tools=list_tools, on_call_tool=call_tool)
    app = mcp_app(server, event_store)

    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            lines = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
            up.header_lines.extend(lines)
            last_event_id = dict(lines).get("last-event-id")
            if scope["method"] == "GET" and last_event_id is not None:
                up.resumed_from.append(last_event_id)

        async def sending(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                up.sending(message.get("body", b""))

        await app(scope, receive, sending)

    return recorded


HandAnswer = tuple[int, bytes, bytes]  # status, content type, body


def answering(
    app: ASGIApp, answers: dict[str, Callable[[dict[str, Any]], HandAnswer]], seen: list[dict[str, Any]]
) -> ASGIApp:
    """``app``, but a tools/call of a tool in ``answers`` is answered by ``answers[tool](request)`` (a
    ``HandAnswer``) instead, and the request kept in ``seen``."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        body = b""
        while True:
            part = await receive()
            body += part.get("body", b"")
            if not part.get("more_body"):
                break
        decoded: Any = json.loads(body)
        message = cast("dict[str, Any]", decoded) if isinstance(decoded, dict) else {}
        params: Any = message.get("params")
        call = (
            cast("dict[str, Any]", params) if message.get("method") == "tools/call" and isinstance(params, dict) else {}
        )
        tool = call.get("name")
        if isinstance(tool, str) and tool in answers:
            seen.append(message)
            status, content_type, payload = answers[tool](message)
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay, send)

    return wrapped


class Registry(Handshakes):
    """The app's registry of handshake-era sessions, with an event for each session that joins or leaves."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = anyio.Event()

    def join(self, ctx: ServerRequestContext[Any, Any], principal: Principal | None) -> None:
        connection = getattr(ctx.session, "_connection", None)
        if isinstance(connection, Connection):
            # Registered before the registry's own callback, so it runs after it (an exit stack runs last in, first).
            connection.exit_stack.callback(self._changed_now)
        super().join(ctx, principal)
        self._changed_now()

    def _changed_now(self) -> None:
        self._changed.set()  # whichever event is waited on by then

    async def until(self, live: int) -> None:
        with anyio.fail_after(5):
            while len(self) != live:
                self._changed = anyio.Event()
                await self._changed.wait()


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> list[Registry]:
    """Every Handshakes registry the apps of the test make (one per app)."""
    made: list[Registry] = []

    def make() -> Registry:
        made.append(Registry())
        return made[-1]

    monkeypatch.setattr(web_app, "Handshakes", make)
    return made


@dataclass
class Wire:
    """What a client sent: each POSTed JSON-RPC message, and its session id."""

    posted: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    session_id: str | None = None

    def call_ids(self) -> list[Any]:
        return [m["id"] for m in self.posted if m.get("method") == "tools/call"]


@dataclass
class Heard:
    """The server's notifications a client heard (by method), and whether its GET stream is open."""

    methods: list[str] = field(default_factory=list[str])
    listening: anyio.Event = field(default_factory=anyio.Event)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def hear(self, message: IncomingMessage) -> None:
        if isinstance(message, types.ServerNotification):
            self.methods.append(message.method)
            self._changed.set()

    async def until(self, method: str) -> None:
        with anyio.fail_after(5):
            while method not in self.methods:
                self._changed = anyio.Event()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def client_of(
    url: str, token: str, wire: Wire | None = None, heard: Heard | None = None
) -> AsyncGenerator[Client, None]:
    """The official SDK client in the handshake era (no sampling, elicitation or roots), its wire recorded
    (and, given ``heard``, the notifications it hears)."""
    wire = wire or Wire()

    async def request(request: httpx2.Request) -> None:
        if request.method == "POST":
            wire.posted.append(json.loads(request.content))

    async def response(response: httpx2.Response) -> None:
        wire.session_id = response.headers.get("mcp-session-id") or wire.session_id
        if heard is not None and response.request.method == "GET" and response.status_code == 200:
            heard.listening.set()

    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            event_hooks={"request": [request], "response": [response]},
        ) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode="legacy",  # type: ignore[arg-type]
            cache=None,
            message_handler=heard.hear if heard is not None else None,
        ) as client,
    ):
        yield client


async def _token(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, url: str) -> str:
    """A handshake-era upstream `calc` behind gateway `g` (all tools but `secret`), and Ada's token for it."""
    await servers.create(
        store,
        operator,
        ServerSpec("calc", Transport.STREAMABLE_HTTP, url=url, auth_kind=AuthKind.BEARER, era=ProtocolEra.LEGACY),
    )
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset(TOOLS) - {"secret"})
    await gateways.create(store, operator, GatewaySpec("g", servers=(GatewayServerSpec("calc", tools=tools),)))
    await hosts.create(store, operator, HostSpec("agent"))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    await identities.create(
        store, vault, hasher, operator, server="calc", owner="ada@example.com", secret=bearer_secret(CREDENTIAL)
    )
    _c, _t, token = await connections.create(
        store, hasher, operator, host="agent", gateway="g", member="ada@example.com"
    )
    return token


ADD_SEVEN: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 99,
    "method": "tools/call",
    "params": {"name": "calc__add", "arguments": {"n": 7}},
}


def _raw_call(session_id: str, token: str, message: dict[str, Any] = ADD_SEVEN) -> tuple[dict[str, str], bytes]:
    """Headers and body of a POST of ``message`` on a session, as the SDK client would send it."""
    headers = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": HANDSHAKE_VERSION,
        "mcp-session-id": session_id,
    }
    return headers, json.dumps(message).encode()


async def _audited_calls(store: Store) -> list[tuple[str | None, str, str | None, str | None]]:
    """(name, outcome, reason, upstream status) of every audited tools/call, in order."""
    async with store.transaction() as conn:
        query = (
            sa.select(schema.audit_events)
            .where(schema.audit_events.c.method == "tools/call")
            .order_by(schema.audit_events.c.occurred_at)
        )
        return [(r.name, r.outcome, r.reason, r.upstream_status) for r in (await conn.execute(query)).all()]


@contextlib.asynccontextmanager
async def slow_call_in_flight(
    up: Upstream, http: httpx2.AsyncClient, url: str, token: str, session_id: str, request_id: str
) -> AsyncGenerator[list[httpx2.Response], None]:
    """A raw `tools/call` of the `slow` tool, running upstream for the block; its answer is in the list after."""
    call = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": "calc__slow"}}
    answers: list[httpx2.Response] = []

    async def slow() -> None:
        headers, body = _raw_call(session_id, token, call)
        answers.append(await http.post(url, headers=headers, content=body))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await up.started.wait()
            yield answers


def _answer_of(response: httpx2.Response) -> Any:
    """The JSON-RPC answer in a response to a POST: its JSON body, or the last event of its event stream."""
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    data = [line.removeprefix("data:").strip() for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1])


def _text(result: types.CallToolResult) -> str:
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def test_later_calls_of_a_handshake_era_client_take_the_hot_path_with_the_members_credential(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            steps: list[float] = []

            async def progress(progress: float, total: float | None, message: str | None) -> None:
                steps.append(progress)

            for n in (1, 2, 3):
                steps.clear()
                result = await client.call_tool("calc__add", {"n": n}, progress_callback=progress)
                assert _text(result) == str(n + 1)
                assert steps == [1, 2]
            assert "calc__secret" not in [t.name for t in (await client.list_tools()).tools]
            with pytest.raises(MCPError) as caught:
                await client.call_tool("calc__secret", {"n": 1})
            assert caught.value.code == types.INVALID_PARAMS
    # The first call opened the upstream session (full path, as any first request would); the later ones were
    # posted into it.
    assert [seen.hot for seen in up.calls] == [False, True, True]
    assert len({seen.session_id for seen in up.calls}) == 1
    assert [seen.authorization for seen in up.calls] == [f"Bearer {CREDENTIAL}"] * 3
    assert not up.of("secret")
    assert not [line for line in up.header_lines if token in line[1]]


async def test_concurrent_calls_over_two_sessions_of_one_identity_each_get_their_own_answer(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor, registries: list[Registry]
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion:
            url = f"{bastion}/g/g/mcp"
            wires = (Wire(), Wire())
            async with client_of(url, token, wires[0]) as first, client_of(url, token, wires[1]) as second:
                await registries[0].until(2)
                await first.call_tool("calc__add", {"n": 0})  # opens the upstream session
                await second.call_tool("calc__add", {"n": 0})  # so that both sessions' request ids line up
                answers: dict[tuple[int, int], str] = {}

                async def call(which: int, client: Client, n: int) -> None:
                    answers[which, n] = _text(await client.call_tool("calc__add", {"n": n}))

                async with anyio.create_task_group() as tg:
                    for n in range(20):
                        tg.start_soon(call, 0, first, n)
                        tg.start_soon(call, 1, second, 1000 + n)
    assert answers == {(0, n): str(n + 1) for n in range(20)} | {(1, 1000 + n): str(1001 + n) for n in range(20)}
    # The same downstream request ids in each session: only the ids Bastion gives them upstream tell them apart.
    assert sorted(wires[0].call_ids()) == sorted(wires[1].call_ids())
    assert wires[0].session_id != wires[1].session_id
    concurrent = up.calls[2:]
    assert len(concurrent) == 40
    assert all(seen.hot for seen in up.calls[1:])
    assert len({seen.request_id for seen in concurrent}) == 40
    assert len({seen.session_id for seen in up.calls}) == 1


async def test_cancelling_a_hot_path_call_cancels_it_upstream_and_is_audited_as_cancelled(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:

                    async def slow() -> None:
                        await client.call_tool("calc__slow", {})

                    tg.start_soon(slow)
                    await up.started.wait()
                    tg.cancel_scope.cancel()  # the SDK client sends notifications/cancelled
                await up.cancelled.wait()
            # The session serves on, still on the hot path.
            assert _text(await client.call_tool("calc__add", {"n": 2})) == "3"
    assert [(seen.tool, seen.hot) for seen in up.calls] == [("add", False), ("slow", True), ("add", True)]
    events = await _audited_calls(store)
    assert [(name, outcome) for name, outcome, _reason, _status in events] == [
        ("calc__add", "ok"),
        ("calc__slow", "error"),
        ("calc__add", "ok"),
    ]
    assert events[1][2] == "cancelled"


async def test_a_cancelled_hot_path_call_is_answered_with_the_sdks_request_cancelled_error(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        wire = Wire()
        async with (
            serving(create_app(settings, store)) as bastion,
            client_of(f"{bastion}/g/g/mcp", token, wire) as client,
            httpx2.AsyncClient(timeout=10) as http,
        ):
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            assert wire.session_id is not None
            url = f"{bastion}/g/g/mcp"
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "mine"}}
            async with slow_call_in_flight(up, http, url, token, wire.session_id, "mine") as answers:
                headers, body = _raw_call(wire.session_id, token, cancel)
                assert (await http.post(url, headers=headers, content=body)).status_code == 202
            with anyio.fail_after(5):
                await up.cancelled.wait()
    (answer,) = answers
    assert _answer_of(answer) == {
        "jsonrpc": "2.0",
        "id": "mine",
        "error": {"code": -32800, "message": "Request cancelled"},
    }
    assert [(seen.tool, seen.hot) for seen in up.calls] == [("add", False), ("slow", True)]


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_call_to_an_upstream_that_forgot_its_session_is_sent_again_into_a_fresh_one(
    fast_path: bool, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    settings = settings.model_copy(update={"fast_path": fast_path})
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})
            await client.call_tool("calc__add", {"n": 2})
            stale = up.calls[-1].session_id
            assert stale is not None
            async with httpx2.AsyncClient(timeout=10) as http:
                ended = await http.delete(
                    f"{upstream}/mcp", headers={"mcp-session-id": stale, "mcp-protocol-version": HANDSHAKE_VERSION}
                )
                assert ended.status_code == 200
                gone = await http.post(
                    f"{upstream}/mcp", headers=_raw_call(stale, "unused")[0], content=_raw_call(stale, "unused")[1]
                )
                assert gone.status_code == 404  # the upstream no longer knows the session
            assert _text(await client.call_tool("calc__add", {"n": 3})) == "4"
            assert _text(await client.call_tool("calc__add", {"n": 4})) == "5"
    # Either path: the upstream's 404 closes the forgotten session and the call is sent once more, into a new one.
    assert [seen.hot for seen in up.calls] == [False, fast_path, fast_path, fast_path]
    fresh = up.calls[2].session_id
    assert fresh not in (None, stale)
    assert up.calls[3].session_id == fresh  # reopened once, then kept


async def test_an_upstreams_ping_mid_call_is_answered_and_its_sampling_request_refused(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})
            with anyio.fail_after(5):
                assert _text(await client.call_tool("calc__ping", {})) == "pong"
                assert _text(await client.call_tool("calc__sample", {})) == str(types.METHOD_NOT_FOUND)
    assert [(seen.tool, seen.hot) for seen in up.calls] == [("add", False), ("ping", True), ("sample", True)]


async def test_a_session_is_served_only_to_the_token_that_opened_it(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        await hosts.create(store, operator, HostSpec("other-agent"))
        _c, _t, other = await connections.create(
            store, hasher, operator, host="other-agent", gateway="g", member="ada@example.com"
        )
        wire = Wire()
        async with (
            serving(create_app(settings, store)) as bastion,
            client_of(f"{bastion}/g/g/mcp", token, wire) as client,
            httpx2.AsyncClient(timeout=10) as http,
        ):
            await client.call_tool("calc__add", {"n": 1})
            await client.call_tool("calc__add", {"n": 2})  # the hot path serves this session now
            assert wire.session_id is not None
            headers, body = _raw_call(wire.session_id, other)
            stolen = await http.post(f"{bastion}/g/g/mcp", headers=headers, content=body)
            assert stolen.status_code == 404
            # Its own token is served on it (the same request, but for the token).
            headers, body = _raw_call(wire.session_id, token)
            own = await http.post(f"{bastion}/g/g/mcp", headers=headers, content=body)
            assert own.status_code == 200
            assert _answer_of(own) == {
                "jsonrpc": "2.0",
                "id": 99,
                "result": {"content": [{"type": "text", "text": "8"}], "isError": False},
            }
    assert [(seen.arguments, seen.hot) for seen in up.calls] == [({"n": 1}, False), ({"n": 2}, True), ({"n": 7}, True)]


async def test_the_audit_log_records_a_hot_path_calls_outcome_as_the_full_path_does(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            assert not (await client.call_tool("calc__fine", {})).is_error
            assert (await client.call_tool("calc__fail", {})).is_error
            with pytest.raises(MCPError) as caught:
                await client.call_tool("calc__boom", {})
            assert caught.value.code == -32099
    assert [(seen.tool, seen.hot) for seen in up.calls] == [
        ("add", False),
        ("fine", True),
        ("fail", True),
        ("boom", True),
    ]
    events = {name: (outcome, status) for name, outcome, _reason, status in await _audited_calls(store)}
    assert events == {
        "calc__add": ("ok", "ok"),
        "calc__fine": ("ok", "ok"),
        "calc__fail": ("ok", "error"),
        "calc__boom": ("error", "-32099"),
    }


async def test_a_session_its_client_ended_leaves_the_registry_and_is_served_no_more(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor, registries: list[Registry]
) -> None:
    up = Upstream()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        wire = Wire()
        async with serving(create_app(settings, store)) as bastion, httpx2.AsyncClient(timeout=10) as http:
            (registry,) = registries
            async with client_of(f"{bastion}/g/g/mcp", token, wire) as client:
                await registry.until(1)
                await client.call_tool("calc__add", {"n": 1})
                await client.call_tool("calc__add", {"n": 2})
            await registry.until(0)  # the SDK client sent DELETE on its way out
            assert wire.session_id is not None
            headers, body = _raw_call(wire.session_id, token)
            assert (await http.post(f"{bastion}/g/g/mcp", headers=headers, content=body)).status_code == 404
    assert [seen.hot for seen in up.calls] == [False, True]


def empty_first_resumption(app: ASGIApp, answered_empty: list[bytes]) -> ASGIApp:
    """``app``, except that the first resumption from each event id gets an empty event stream (nothing new yet)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        last = dict(scope.get("headers", [])).get(b"last-event-id") if scope["type"] == "http" else None
        if last is None or last in answered_empty or scope["method"] != "GET":
            await app(scope, receive, send)
            return
        answered_empty.append(last)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b""})

    return wrapped


@pytest.mark.parametrize("empty_first", [False, True])
async def test_a_call_whose_upstream_stream_closes_before_the_answer_is_resumed_and_answered_on_the_hot_path(
    empty_first: bool, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    answered_empty: list[bytes] = []
    app = upstream_app(up, MemoryEventStore())
    # An empty resumed stream does not lose the event id: Bastion resumes from it again (as the SDK client does).
    async with serving(empty_first_resumption(app, answered_empty) if empty_first else app) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            steps: list[float] = []

            async def progress(progress: float, total: float | None, message: str | None) -> None:
                steps.append(progress)

            with anyio.fail_after(5):
                result = await client.call_tool("calc__poll", {}, progress_callback=progress)
    assert (_text(result), result.is_error) == ("polled", False)
    assert steps == [1, 2]  # the one before the stream closed, and the one replayed after it
    assert [(seen.tool, seen.hot) for seen in up.calls] == [("add", False), ("poll", True)]
    assert len(up.resumed_from) == 1  # Bastion came back with the last event id it had read (and stayed)
    assert len(answered_empty) == (1 if empty_first else 0)


async def test_a_jsonrpc_error_the_upstream_answers_at_an_http_error_status_reaches_the_caller_as_that_error(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    seen: list[dict[str, Any]] = []

    def bad_n(request: dict[str, Any]) -> HandAnswer:
        error = {"jsonrpc": "2.0", "id": request["id"], "error": {"code": types.INVALID_PARAMS, "message": "bad n"}}
        return 400, b"application/json", json.dumps(error).encode()

    async with serving(answering(upstream_app(up), {"bad": bad_n}, seen)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            with pytest.raises(MCPError) as caught:
                await client.call_tool("calc__bad", {"n": -1})
    assert (caught.value.code, caught.value.error.message) == (types.INVALID_PARAMS, "bad n")
    (request,) = seen
    assert str(request["id"]).startswith("bastion-")  # the hot path posted it
    events = await _audited_calls(store)
    assert [(name, outcome) for name, outcome, _reason, _status in events] == [
        ("calc__add", "ok"),
        ("calc__bad", "error"),
    ]
    assert events[1][2:] == (str(types.INVALID_PARAMS), str(types.INVALID_PARAMS))  # reason and upstream status


async def test_an_upstream_event_split_over_several_data_lines_reaches_the_caller_whole(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    seen: list[dict[str, Any]] = []

    def split(request: dict[str, Any]) -> HandAnswer:
        token = json.dumps(request["params"]["_meta"]["progressToken"])
        lines = (
            "event: message",
            'data: {"jsonrpc":"2.0","method":"notifications/progress",',
            f'data: "params":{{"progressToken":{token},"progress":1,"total":2}}}}',
            "",
            "event: message",
            f'data: {{"jsonrpc":"2.0","id":{json.dumps(request["id"])},',
            'data: "result":{"content":[{"type":"text","text":"split"}],"isError":false}}',
            "",
            "",
        )
        return 200, b"text/event-stream", "\r\n".join(lines).encode()

    async with serving(answering(upstream_app(up), {"split": split}, seen)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, client_of(f"{bastion}/g/g/mcp", token) as client:
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            steps: list[tuple[float, float | None]] = []

            async def progress(progress: float, total: float | None, message: str | None) -> None:
                steps.append((progress, total))

            with anyio.fail_after(5):
                result = await client.call_tool("calc__split", {}, progress_callback=progress)
    assert _text(result) == "split"
    assert steps == [(1, 2)]
    (request,) = seen
    assert str(request["id"]).startswith("bastion-")


async def test_the_callers_progress_token_never_reaches_the_upstream_yet_its_progress_does_reach_the_caller(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    up = Upstream()
    wire = Wire()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            client_of(f"{bastion}/g/g/mcp", token, wire) as client,
        ):
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            steps: list[float] = []

            async def progress(progress: float, total: float | None, message: str | None) -> None:
                steps.append(progress)

            assert _text(await client.call_tool("calc__add", {"n": 2}, progress_callback=progress)) == "3"
    calls = [m for m in wire.posted if m.get("method") == "tools/call"]
    caller = calls[-1]["params"]["_meta"]["progressToken"]  # the SDK client's token for the hot call
    hot = up.calls[-1]
    assert (hot.tool, hot.hot) == ("add", True)
    assert hot.progress_token == hot.request_id  # Bastion's own token upstream: the request's own id
    assert caller != hot.progress_token
    assert steps == [1, 2]  # mapped back to the caller's token


async def test_a_list_changed_on_a_calls_stream_is_not_passed_on_raw_but_reaches_the_sessions_it_concerns(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor, registries: list[Registry]
) -> None:
    up = Upstream()
    wire = Wire()
    other = Heard()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            client_of(f"{bastion}/g/g/mcp", token, wire) as client,
            client_of(f"{bastion}/g/g/mcp", token, heard=other),
            httpx2.AsyncClient(timeout=10) as http,
        ):
            await registries[0].until(2)  # both sessions listen (they joined on notifications/initialized) ...
            with anyio.fail_after(5):
                await other.listening.wait()  # ... and the other one's GET stream is open
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            assert wire.session_id is not None
            call = {"jsonrpc": "2.0", "id": "change", "method": "tools/call", "params": {"name": "calc__change"}}
            headers, body = _raw_call(wire.session_id, token, call)
            answer = await http.post(f"{bastion}/g/g/mcp", headers=headers, content=body)
            await other.until("notifications/tools/list_changed")
    assert "list_changed" not in answer.text
    assert _answer_of(answer) == {
        "jsonrpc": "2.0",
        "id": "change",
        "result": {"content": [{"type": "text", "text": "done"}], "isError": False},
    }
    assert [(seen.tool, seen.hot) for seen in up.calls] == [("add", False), ("change", True)]


async def test_ending_the_session_cancels_its_hot_path_call_upstream(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor, registries: list[Registry]
) -> None:
    up = Upstream()
    wire = Wire()
    async with serving(upstream_app(up)) as upstream:
        token = await _token(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            client_of(f"{bastion}/g/g/mcp", token, wire) as client,
            httpx2.AsyncClient(timeout=10) as http,
        ):
            await client.call_tool("calc__add", {"n": 1})  # opens the upstream session
            assert wire.session_id is not None
            url = f"{bastion}/g/g/mcp"
            async with slow_call_in_flight(up, http, url, token, wire.session_id, "long") as answers:
                session = {"mcp-session-id": wire.session_id, "mcp-protocol-version": HANDSHAKE_VERSION}
                ended = await http.delete(url, headers={"authorization": f"Bearer {token}", **session})
                assert ended.status_code == 200
                with anyio.fail_after(5):
                    await up.cancelled.wait()
            await registries[0].until(0)
    assert [(seen.tool, seen.hot) for seen in up.calls] == [("add", False), ("slow", True)]
    (answer,) = answers
    assert _answer_of(answer)["error"]["code"] == -32800
