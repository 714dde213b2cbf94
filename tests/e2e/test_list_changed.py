"""`list_changed` relayed: an upstream's change reaches the agents it concerns, in both eras, and no one else's.

The upstream here adds a tool when `grow` is called and tells only the calling session (a handshake-era
session on its GET stream, a 2026-era one on the listen stream opened with the caller's credential).
Readiness is waited on, never slept on: the upstream signals when Bastion's GET or listen stream to it is
open, and the agent's own GET stream or listen acknowledgement is waited on before anything changes.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import sqlalchemy as sa
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import Subscription
from mcp.server import Server, ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Provisioning, ProvisionMode, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
AGENT_MODES = ("legacy", "2026-07-28")
UPSTREAM_ERAS = (ProtocolEra.LEGACY, ProtocolEra.MODERN)
WAIT_S = 10


@dataclass
class Upstream:
    """A server whose tools grow per credential; ``ready[credential]``: Bastion's notification channel is open."""

    tools: dict[str, list[str]] = field(default_factory=lambda: defaultdict(lambda: ["grow"]))
    ready: dict[str, anyio.Event] = field(default_factory=lambda: defaultdict(anyio.Event))
    buses: dict[str, InMemorySubscriptionBus] = field(default_factory=lambda: defaultdict(InMemorySubscriptionBus))


def _credential(ctx: ServerRequestContext[Any, Any]) -> str:
    request = ctx.request
    return request.headers.get("authorization", "<none>") if request is not None else "<none>"


def changing_upstream(upstream: Upstream) -> ASGIApp:
    async def list_tools(ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        names = upstream.tools[_credential(ctx)]
        return types.ListToolsResult(tools=[types.Tool(name=n, input_schema={"type": "object"}) for n in names])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        credential = _credential(ctx)
        names = upstream.tools[credential]
        names.append(f"extra{len(names)}")
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            await upstream.buses[credential].publish(ToolsListChanged())
        else:
            await ctx.session.send_tool_list_changed()  # this session's GET stream, nobody else's
        return types.CallToolResult(content=[types.TextContent(type="text", text="grown")])

    async def listen(ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams) -> Any:
        credential = _credential(ctx)
        handler = ListenHandler(upstream.buses[credential])
        upstream.ready[credential].set()  # the handler subscribes before its first await
        return await handler(ctx, params)

    server: Server[Any] = Server(
        "changing-upstream", on_list_tools=list_tools, on_call_tool=call_tool, on_subscriptions_listen=listen
    )
    manager = StreamableHTTPSessionManager(app=server)

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] != "GET":
            await manager.handle_request(scope, receive, send)
            return

        async def watching(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                upstream.ready[headers.get("authorization", "<none>")].set()  # the GET stream is registered

        await manager.handle_request(scope, receive, watching)

    class Endpoint:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await endpoint(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None]:
        async with manager.run():
            yield

    return Starlette(routes=[Route("/mcp", Endpoint(), methods=["GET", "POST", "DELETE"])], lifespan=lifespan)


@dataclass
class Agent:
    """The official SDK client through Bastion, recording every change notification it hears."""

    client: Client
    heard: list[str] = field(default_factory=list[str])
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def wait_for(self, method: str, count: int = 1) -> None:
        with anyio.fail_after(WAIT_S):
            while self.heard.count(method) < count:
                await self.changed.wait()
                self.changed = anyio.Event()


@contextlib.asynccontextmanager
async def agent(url: str, token: str, mode: str) -> AsyncGenerator[Agent]:
    """A connected agent whose notification channel is open (GET stream, or an acknowledged listen stream)."""
    get_open = anyio.Event()
    box: list[Agent] = []

    async def on_response(response: httpx2.Response) -> None:
        if response.request.method == "GET" and response.status_code == 200:
            get_open.set()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ServerNotification) and message.method.endswith("list_changed"):
            box[0].heard.append(message.method)
            box[0].changed.set()

    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=30, event_hooks={"response": [on_response]}
        ) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,  # type: ignore[arg-type]
            cache=None,
            message_handler=on_message,
        ) as client,
    ):
        box.append(Agent(client))
        if mode == "legacy":
            with anyio.fail_after(WAIT_S):
                await get_open.wait()
            yield box[0]
            return
        async with (
            client.listen(
                tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True
            ) as subscription,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_drain, subscription)
            yield box[0]
            tg.cancel_scope.cancel()


async def _drain(subscription: Subscription) -> None:
    async for _event in subscription:
        pass  # the events also reach the message handler


async def _world(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, url: str, era: ProtocolEra) -> None:
    spec = ServerSpec("crm", Transport.STREAMABLE_HTTP, url=url, auth_kind=AuthKind.BEARER, era=era)
    await servers.create(store, operator, spec)
    await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm"),)))
    await hosts.create(store, operator, HostSpec("agent"))


async def _enroll(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, name: str) -> str:
    email = f"{name}@example.com"
    await members.create(store, operator, MemberSpec(email, name))
    secret = bearer_secret(f"{name}-own-credential")
    await identities.create(store, vault, hasher, operator, server="crm", owner=email, secret=secret)
    _c, _t, token = await connections.create(store, hasher, operator, host="agent", gateway="sales", member=email)
    return token


async def _tool_names(client: Client) -> list[str]:
    return sorted(tool.name for tool in (await client.list_tools()).tools)


@pytest.mark.parametrize("era", UPSTREAM_ERAS, ids=lambda e: f"upstream-{e.value}")
@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_an_upstream_tool_change_reaches_the_agent_as_tools_list_changed(
    mode: str, era: ProtocolEra, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    async with serving(changing_upstream(upstream)) as upstream_url:
        await _world(store, vault, hasher, operator, f"{upstream_url}/mcp", era)
        token = await _enroll(store, vault, hasher, operator, "ada")
        async with (
            serving(create_app(settings, store)) as bastion,
            agent(f"{bastion}/g/sales/mcp", token, mode) as ada,
        ):
            assert await _tool_names(ada.client) == ["crm__grow"]
            with anyio.fail_after(WAIT_S):
                await upstream.ready["Bearer ada-own-credential"].wait()
            await ada.client.call_tool("crm__grow", {})
            await ada.wait_for("notifications/tools/list_changed")
            assert await _tool_names(ada.client) == ["crm__extra1", "crm__grow"]
    if mode != "legacy":  # the listen stream is audited like any request: opened, then sealed when it ended
        async with store.transaction() as conn:
            query = sa.select(schema.audit_events).where(schema.audit_events.c.method == "subscriptions/listen")
            listened = [(row.actor, row.outcome, row.seq is not None) for row in (await conn.execute(query)).all()]
        assert listened == [("ada@example.com", "closed", True)]


@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_a_gateway_provisioning_change_tells_connected_agents_every_list_changed(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    async with serving(changing_upstream(upstream)) as upstream_url:
        await _world(store, vault, hasher, operator, f"{upstream_url}/mcp", ProtocolEra.LEGACY)
        token = await _enroll(store, vault, hasher, operator, "ada")
        async with (
            serving(create_app(settings, store)) as bastion,
            agent(f"{bastion}/g/sales/mcp", token, mode) as ada,
        ):
            assert await _tool_names(ada.client) == ["crm__grow"]
            blocked = Provisioning(ProvisionMode.BLOCK_ALL)
            await gateways.update(store, operator, "sales", {"servers": (GatewayServerSpec("crm", tools=blocked),)})
            await ada.wait_for("notifications/resources/list_changed")
            assert ada.heard == [
                "notifications/tools/list_changed",
                "notifications/prompts/list_changed",
                "notifications/resources/list_changed",
            ]
            assert await _tool_names(ada.client) == []


@pytest.mark.parametrize("era", UPSTREAM_ERAS, ids=lambda e: f"upstream-{e.value}")
@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_a_members_upstream_change_never_reaches_another_members_session(
    mode: str, era: ProtocolEra, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    async with serving(changing_upstream(upstream)) as upstream_url:
        await _world(store, vault, hasher, operator, f"{upstream_url}/mcp", era)
        tokens = {name: await _enroll(store, vault, hasher, operator, name) for name in ("ada", "bob")}
        async with (
            serving(create_app(settings, store)) as bastion,
            agent(f"{bastion}/g/sales/mcp", tokens["ada"], mode) as ada,
            agent(f"{bastion}/g/sales/mcp", tokens["bob"], mode) as bob,
        ):
            for person, name in ((ada, "ada"), (bob, "bob")):
                assert await _tool_names(person.client) == ["crm__grow"]
                with anyio.fail_after(WAIT_S):
                    await upstream.ready[f"Bearer {name}-own-credential"].wait()
            await ada.client.call_tool("crm__grow", {})
            await ada.wait_for("notifications/tools/list_changed")
            # A change everyone hears comes after anything Bastion relayed before it, on each session's channel.
            await gateways.update(store, operator, "sales", {"name": "Sales, renamed"})
            await bob.wait_for("notifications/resources/list_changed")
            assert bob.heard.count("notifications/tools/list_changed") == 1, bob.heard
            assert await _tool_names(bob.client) == ["crm__grow"]
            assert await _tool_names(ada.client) == ["crm__extra1", "crm__grow"]
