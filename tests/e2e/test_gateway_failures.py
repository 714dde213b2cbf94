"""Upstream failures end in clear JSON-RPC errors, never a hang or a stack trace."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.web.mcp.server import UPSTREAM_UNAVAILABLE
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving
from tests.processes import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def _token(store: Store, hasher: KeyHasher, operator: Actor, url: str) -> str:
    await servers.create(store, operator, ServerSpec("down", Transport.STREAMABLE_HTTP, url=url, connect_timeout_s=2))
    await gateways.create(store, operator, GatewaySpec("g", servers=(GatewayServerSpec("down"),)))
    await hosts.create(store, operator, HostSpec("agent"))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    _c, _t, token = await connections.create(
        store, hasher, operator, host="agent", gateway="g", member="ada@example.com"
    )
    return token


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_an_unreachable_upstream_is_a_clear_error_and_listings_leave_it_out(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    token = await _token(store, hasher, operator, f"http://127.0.0.1:{free_port()}/mcp")
    async with (
        serving(create_app(settings, store)) as bastion,
        gateway_client(f"{bastion}/g/g/mcp", token, mode) as client,
    ):
        assert (await client.list_tools()).tools == []
        with pytest.raises(MCPError) as caught:
            await client.call_tool("down__anything", {})
        assert caught.value.code == UPSTREAM_UNAVAILABLE
        assert "down" in caught.value.message
        assert "Traceback" not in caught.value.message


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_call_whose_pooled_session_closed_under_it_goes_into_a_fresh_one(
    mode: str,
    settings: Settings,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An edit or a pool reset closes a session a call has just leased: the SDK client then refuses to send on it
    (RuntimeError, before anything is sent). That call is retried in a fresh session, never an HTTP 500."""
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        token = await _token(store, hasher, operator, f"{upstream}/mcp")
        real_session = Client.session
        refusals = 0
        full_path = settings.model_copy(update={"fast_path": False})  # the SDK's client carries the call
        async with (
            serving(create_app(full_path, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, mode) as agent,
        ):

            def closed_once(self: Client) -> Any:
                nonlocal refusals
                # Bastion's pooled client to the upstream, the first time a request uses it (the pool reads what the
                # session negotiated as it opens: that is not a request).
                opening = "_hold" in _callers(4)
                if self is not agent and refusals == 0 and not opening:
                    refusals += 1
                    raise RuntimeError("Client must be used within an async context manager")
                return real_session.fget(self)  # type: ignore[union-attr]

            # Every request of the SDK client goes through its session property, which is what refuses.
            monkeypatch.setattr(Client, "session", property(closed_once))
            result = await agent.call_tool("down__whoami", {})
    assert refusals == 1
    assert not result.is_error and recorder.tool_calls[-1].name == "whoami"


def _callers(depth: int) -> list[str]:
    """The names of the functions up to ``depth`` frames above the caller."""
    frame = inspect.currentframe()
    names: list[str] = []
    while frame is not None and len(names) < depth + 1:
        frame = frame.f_back
        if frame is not None:
            names.append(frame.f_code.co_name)
    return names[1:]
