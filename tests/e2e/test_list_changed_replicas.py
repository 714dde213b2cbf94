"""`list_changed` across replicas: what one replica's upstream session hears reaches the agents connected to another.

Two Bastion apps share one PostgreSQL database, as replicas behind a load balancer do. The upstream tells only
the session a call came on, and waits until Bastion's GET stream for that very session is open before it does,
so the agent on replica B can only hear the change through replica A (never through B's own upstream session).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.server import Server, ServerRequestContext
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import wiring
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import ProtocolEra
from bastion.services import gateways
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.e2e.test_list_changed import AGENT_MODES, WAIT_S, _enroll, _tool_names, _world, agent
from tests.mcp_support import gateway_client, mcp_app, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@dataclass
class Upstream:
    """Tools that grow per credential; ``streams[session id]``: Bastion's GET stream for that session is open."""

    tools: dict[str, list[str]] = field(default_factory=lambda: defaultdict(lambda: ["grow"]))
    streams: dict[str, anyio.Event] = field(default_factory=lambda: defaultdict(anyio.Event))


def _header(ctx: ServerRequestContext[Any, Any], name: str) -> str:
    request = ctx.request
    return request.headers.get(name, "<none>") if request is not None else "<none>"


def changing_upstream(upstream: Upstream) -> ASGIApp:
    async def list_tools(ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        names = upstream.tools[_header(ctx, "authorization")]
        return types.ListToolsResult(tools=[types.Tool(name=n, input_schema={"type": "object"}) for n in names])

    async def call_tool(ctx: ServerRequestContext[Any, Any], _p: types.CallToolRequestParams) -> Any:
        names = upstream.tools[_header(ctx, "authorization")]
        names.append(f"extra{len(names)}")
        with anyio.fail_after(WAIT_S):
            await upstream.streams[_header(ctx, "mcp-session-id")].wait()
        await ctx.session.send_tool_list_changed()  # this session's GET stream (replica A's), nobody else's
        return types.CallToolResult(content=[types.TextContent(type="text", text="grown")])

    app = mcp_app(Server("changing-upstream", on_list_tools=list_tools, on_call_tool=call_tool))

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def watching(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                upstream.streams[headers.get("mcp-session-id", "<none>")].set()  # the GET stream is registered

        await app(scope, receive, watching)

    return watched


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_an_upstream_change_heard_on_one_replica_reaches_the_agent_on_another_and_no_one_else(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    other_store = wiring.store_from(settings)  # replica B's own engine and bus, on the same database
    try:
        async with serving(changing_upstream(upstream)) as upstream_url:
            await _world(store, vault, hasher, operator, f"{upstream_url}/mcp", ProtocolEra.LEGACY)
            tokens = {name: await _enroll(store, vault, hasher, operator, name) for name in ("ada", "bob")}
            async with (
                serving(create_app(settings, store)) as replica_a,
                serving(create_app(settings, other_store)) as replica_b,
                agent(f"{replica_b}/g/sales/mcp", tokens["ada"], mode) as ada,
                agent(f"{replica_b}/g/sales/mcp", tokens["bob"], mode) as bob,
                gateway_client(f"{replica_a}/g/sales/mcp", tokens["ada"], "legacy") as ada_through_a,
            ):
                for person in (ada, bob):
                    assert await _tool_names(person.client) == ["crm__grow"]
                assert await _tool_names(ada_through_a) == ["crm__grow"]
                await ada_through_a.call_tool("crm__grow", {})
                await ada.wait_for("notifications/tools/list_changed")
                assert await _tool_names(ada.client) == ["crm__extra1", "crm__grow"]
                # A change everyone hears comes after anything replica B relayed before it, on each session's channel.
                await gateways.update(store, operator, "sales", {"name": "Sales, renamed"})
                await bob.wait_for("notifications/resources/list_changed")
                assert bob.heard.count("notifications/tools/list_changed") == 1, bob.heard
                assert await _tool_names(bob.client) == ["crm__grow"]
    finally:
        await other_store.close()
