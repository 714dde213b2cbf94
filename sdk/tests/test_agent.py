"""`agent.as_user(email)`: an official MCP client to a gateway as that person, and clear errors when it cannot be."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

import mcp_types as types
import pytest
from mcp.server import Server, ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agent_support import event_body, serving
from bastion_agent import Agent, Delivered, Disabled, GatewayRefused, NotEnrolled, TokenMap, parse_event

pytestmark = pytest.mark.anyio
LINK = "https://bastion.example.com/enroll/bsl_link"

# How the fake gateway answers each token: like Bastion, a JSON body {"error", "error_description"} when refused.
REFUSALS: dict[str, tuple[int, str]] = {
    "bst_revoked": (401, "invalid_token"),
    "bst_host_off": (403, "host_disabled"),
    "bst_member_off": (403, "member_disabled"),
    "bst_odd": (403, "something_new"),
}


def fake_gateway(seen: list[str]) -> ASGIApp:
    """A gateway whose `whoami` tool answers with the bearer token it was called with."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name="whoami", input_schema={"type": "object"})])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        auth = ctx.request.headers.get("authorization", "") if ctx.request is not None else ""
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"{params.name}: {auth}")])

    server: Server[Any] = Server("fake-gateway", on_list_tools=list_tools, on_call_tool=call_tool)
    manager = StreamableHTTPSessionManager(app=server)

    class Endpoint:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            token = headers.get("authorization", "").removeprefix("Bearer ")
            seen.append(token)
            if token in REFUSALS:
                status, error = REFUSALS[token]
                raw = json.dumps({"error": error, "error_description": f"refused: {error}"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": raw})
                return
            await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None]:
        async with manager.run():
            yield

    return Starlette(routes=[Route("/g/sales/mcp", Endpoint(), methods=["GET", "POST", "DELETE"])], lifespan=lifespan)


@pytest.fixture
async def gateway() -> AsyncGenerator[tuple[str, list[str]]]:
    seen: list[str] = []
    async with serving(fake_gateway(seen)) as url:
        yield url, seen


async def _enroll(token_map: TokenMap, gateway_url: str, email: str, token: str, connection: str) -> None:
    body = json.loads(event_body("connection.created", version=1, connection_id=connection, member=(connection, email)))
    body["data"]["mcp_url"] = f"{gateway_url}/g/sales/mcp"
    await token_map.apply(parse_event(json.dumps(body).encode()), delivered=Delivered(token, f"tok-{connection}"))


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
async def test_as_user_calls_the_gateway_with_that_persons_token(
    mode: str, token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, seen = gateway
    await _enroll(token_map, url, "ada@example.com", "bst_ada", "c-ada")
    await _enroll(token_map, url, "bob@example.com", "bst_bob", "c-bob")
    agent = Agent(token_map, bastion_url=url, connect_link=LINK, mode=mode)
    for person, token in (("ada@example.com", "bst_ada"), ("bob@example.com", "bst_bob")):
        async with agent.as_user(person) as client:
            assert [t.name for t in (await client.list_tools()).tools] == ["whoami"]
            result = await client.call_tool("whoami", {})
            assert result.content[0].text == f"whoami: Bearer {token}"  # type: ignore[union-attr]
    assert set(seen) == {"bst_ada", "bst_bob"}


async def test_a_person_not_in_the_map_gets_the_link_without_any_call(
    token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, seen = gateway
    agent = Agent(token_map, bastion_url=url, connect_link=lambda person: f"{LINK}?for={person}")
    with pytest.raises(NotEnrolled) as caught:
        async with agent.as_user("grace@example.com"):
            pass
    assert caught.value.link == f"{LINK}?for=grace@example.com"
    assert "send them the connection link" in str(caught.value)
    assert seen == []


async def test_a_401_for_a_revoked_token_drops_it_from_the_map(
    token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, seen = gateway
    await _enroll(token_map, url, "ada@example.com", "bst_revoked", "c-ada")
    agent = Agent(token_map, bastion_url=url, connect_link=LINK)
    with pytest.raises(NotEnrolled) as caught:
        async with agent.as_user("ada@example.com") as client:
            await client.call_tool("whoami", {})
    assert caught.value.reason == "revoked"
    assert caught.value.link == LINK
    assert (await token_map.enrollments("ada@example.com"))[0].status == "revoked"
    # The next attempt fails at once, without calling the gateway again.
    calls = len(seen)
    with pytest.raises(NotEnrolled):
        async with agent.as_user("ada@example.com"):
            pass
    assert len(seen) == calls


async def test_a_refusal_the_block_swallowed_still_updates_the_map(
    token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, _seen = gateway
    await _enroll(token_map, url, "ada@example.com", "bst_revoked", "c-ada")
    agent = Agent(token_map, bastion_url=url)
    async with agent.as_user("ada@example.com") as client:
        with pytest.raises(Exception, match="error response"):
            await client.call_tool("whoami", {})
    assert (await token_map.enrollments("ada@example.com"))[0].status == "revoked"


@pytest.mark.parametrize(
    ("token", "reason"), [("bst_host_off", "host_disabled"), ("bst_member_off", "member_disabled")]
)
async def test_a_403_is_a_clear_disabled_error_and_the_token_stays(
    token: str, reason: str, token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, _seen = gateway
    await _enroll(token_map, url, "ada@example.com", token, "c-ada")
    agent = Agent(token_map, bastion_url=url)
    with pytest.raises(Disabled) as caught:
        async with agent.as_user("ada@example.com") as client:
            await client.call_tool("whoami", {})
    assert caught.value.reason == reason
    assert f"refused: {reason}" in str(caught.value)
    assert (await token_map.enrollments("ada@example.com"))[0].status == "active"


async def test_an_unknown_refusal_is_reported_as_such(token_map: TokenMap, gateway: tuple[str, list[str]]) -> None:
    url, _seen = gateway
    await _enroll(token_map, url, "ada@example.com", "bst_odd", "c-ada")
    with pytest.raises(GatewayRefused, match="HTTP 403 something_new"):
        async with Agent(token_map, bastion_url=url).as_user("ada@example.com") as client:
            await client.call_tool("whoami", {})


async def test_errors_unrelated_to_the_gateway_pass_through(
    token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, _seen = gateway
    await _enroll(token_map, url, "ada@example.com", "bst_ada", "c-ada")
    with pytest.raises(KeyError):
        async with Agent(token_map, bastion_url=url).as_user("ada@example.com"):
            raise KeyError("the agent's own bug")


async def test_a_disabled_host_in_the_map_refuses_before_calling(
    token_map: TokenMap, gateway: tuple[str, list[str]]
) -> None:
    url, seen = gateway
    await _enroll(token_map, url, "ada@example.com", "bst_ada", "c-ada")
    await token_map.apply(parse_event(event_body("host.disabled", version=1, connection_id=None, member=None)))
    agent = Agent(token_map, bastion_url=url)
    with pytest.raises(Disabled, match="this agent \\(its host\\) is disabled"):
        async with agent.as_user("ada@example.com"):
            pass
    assert seen == []
    assert "bst_ada" not in repr(agent)
