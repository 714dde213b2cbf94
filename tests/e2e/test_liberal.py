"""Liberal in what upstreams send: what sloppy servers met in the wild send still reaches the caller as meant."""

from __future__ import annotations

from typing import Any

import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import ProtocolEra, Transport
from bastion.domain.specs import ServerSpec
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.fixtures.conformance_server import WithoutResultType
from tests.mcp_support import gateway_client, mcp_app, serving
from tests.worlds import ada_connected

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
MODERN = "2026-07-28"


def sloppy_upstream() -> Server[Any]:
    """`ask` elicits a name on the standalone stream, naming no call; `hello` answers plainly."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        schema = {"type": "object", "properties": {}}
        return types.ListToolsResult(
            tools=[types.Tool(name=n, description=n, input_schema=schema) for n in ("ask", "hello")]
        )

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        if params.name == "hello":
            return types.CallToolResult(content=[types.TextContent(type="text", text="hello")])
        schema: Any = {"type": "object", "properties": {"name": {"type": "string"}}}
        request = types.ElicitRequest(params=types.ElicitRequestFormParams(message="Who?", requested_schema=schema))
        answer = await ctx.session.send_request(request, types.ElicitResult)  # no related request: standalone stream
        name = (answer.content or {}).get("name") if answer.action == "accept" else answer.action
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"hi {name}")])

    return Server("sloppy", version="1", on_list_tools=list_tools, on_call_tool=call_tool)


async def test_a_request_naming_no_call_reaches_the_caller_of_the_only_call_in_flight(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    asked: list[str] = []

    async def elicit(_ctx: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with serving(mcp_app(sloppy_upstream())) as up:
        spec = ServerSpec("up", Transport.STREAMABLE_HTTP, url=f"{up}/mcp", era=ProtocolEra.LEGACY)
        token = await ada_connected(store, hasher, operator, spec)
        async with serving(create_app(settings, store)) as bastion:
            import httpx2

            async with (
                httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
                Client(
                    streamable_http_client(f"{bastion}/g/g/mcp", http_client=http),  # type: ignore[arg-type]
                    mode="legacy",
                    elicitation_callback=elicit,
                ) as ada,
            ):
                result = await ada.call_tool("up__ask", {})
    assert asked == ["Who?"]
    assert result.content[0].text == "hi Ada"  # type: ignore[union-attr]


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_2026_result_without_result_type_reaches_a_2026_caller_as_a_complete_result(
    fast_path: bool, settings: Settings, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    async with serving(WithoutResultType(mcp_app(sloppy_upstream()))) as up:
        spec = ServerSpec("up", Transport.STREAMABLE_HTTP, url=f"{up}/mcp", era=ProtocolEra.MODERN)
        token = await ada_connected(store, hasher, operator, spec)
        chosen = settings.model_copy(update={"fast_path": fast_path})
        async with (
            serving(create_app(chosen, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, MODERN) as ada,
        ):
            tools = await ada.list_tools()
            first = await ada.call_tool("up__hello", {})
            second = await ada.call_tool("up__hello", {})  # on the fast path once the upstream's era is known
    assert [t.name for t in tools.tools] == ["up__ask", "up__hello"]
    assert first.content[0].text == second.content[0].text == "hello"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", [MODERN, "legacy"])
async def test_a_resource_a_handshake_era_upstream_does_not_have_is_invalid_params_naming_the_uri(
    mode: str, settings: Settings, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    async def read_resource(_ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> Any:
        raise MCPError(-32002, "Resource not found", {"uri": str(params.uri)})

    server: Server[Any] = Server("legacy-resources", version="1", on_read_resource=read_resource)
    async with serving(mcp_app(server)) as up:
        spec = ServerSpec("up", Transport.STREAMABLE_HTTP, url=f"{up}/mcp", era=ProtocolEra.LEGACY)
        token = await ada_connected(store, hasher, operator, spec)
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, mode) as ada,
        ):
            with pytest.raises(MCPError) as caught:
                await ada.read_resource("test://missing")
    assert caught.value.code == types.INVALID_PARAMS
    assert caught.value.error.data == {"uri": "test://missing"}
