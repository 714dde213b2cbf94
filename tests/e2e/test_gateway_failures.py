"""Upstream failures end in clear JSON-RPC errors, never a hang or a stack trace."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.pipeline.errors import UPSTREAM_UNAVAILABLE
from bastion.services import connections, gateways, hosts, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.upstream.pool import Lease, UpstreamPool
from bastion.web.app import create_app
from tests.e2e.test_audit_calls import _events as audit_events
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
    real_turn = UpstreamPool.turn
    closed: list[Lease] = []

    @asynccontextmanager
    async def closed_first(self: UpstreamPool, lease: Lease, wait_s: float = 60.0) -> AsyncGenerator[None]:
        if not closed and lease.session is not None:
            # The first call's leased session closes under it (as an edit's or a pool reset's close would), before
            # anything is sent: its SDK client then refuses to send (RuntimeError).
            closed.append(lease)
            self.forget(lease)
            with anyio.fail_after(30):
                await lease.session.ended.wait()
        async with real_turn(self, lease, wait_s):
            yield

    async with serving(recording_upstream(recorder)) as upstream:
        token = await _token(store, hasher, operator, f"{upstream}/mcp")
        full_path = settings.model_copy(update={"fast_path": False})  # the SDK's client carries the call
        async with (
            serving(create_app(full_path, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, mode) as agent,
        ):
            monkeypatch.setattr(UpstreamPool, "turn", closed_first)
            result = await agent.call_tool("down__whoami", {})
    assert len(closed) == 1
    assert not result.is_error and recorder.tool_calls[-1].name == "whoami"


@pytest.mark.parametrize("fast_path", [True, False], ids=["byte-relay", "full-path"])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_an_upstream_that_keeps_failing_is_refused_at_once_until_an_edit_or_a_probe_finds_it_answering(
    mode: str, fast_path: bool, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    port = free_port()
    token = await _token(store, hasher, operator, f"http://127.0.0.1:{port}/mcp")
    tuned = settings.model_copy(update={"fast_path": fast_path, "upstream_failures_to_open": 3})
    recorder = Recorder()
    async with (
        serving(create_app(tuned, store)) as bastion,
        gateway_client(f"{bastion}/g/g/mcp", token, mode) as client,
    ):

        async def error_of_a_call() -> dict[str, Any]:
            with pytest.raises(MCPError) as caught:
                await client.call_tool("down__echo", {"text": "hi"})
            assert caught.value.code == UPSTREAM_UNAVAILABLE, caught.value
            return {"message": caught.value.message, **(caught.value.error.data or {})}

        for _ in range(3):  # nothing listens on the port
            assert (await error_of_a_call())["code"] == "upstream_unavailable"
        async with serving(recording_upstream(recorder), port=port):
            # The upstream is back, but its circuit is open: refused at once, without trying it.
            failing = await error_of_a_call()
            assert failing == {
                "message": "this upstream server keeps failing; calls to it are refused for 5 s",
                "code": "upstream_failing",
                "status": 503,
                "retryAfter": 5,
            }
            assert recorder.tool_calls == []
            # An admin's edit of how the server is reached starts its circuit afresh.
            await servers.update(store, operator, "down", {"connect_timeout_s": 3})
            answer = await client.call_tool("down__echo", {"text": "hi"})
            assert answer.content[0].text == "hi"  # type: ignore[union-attr]
    assert [c.arguments for c in recorder.tool_calls] == [{"text": "hi"}]
    calls = [e for e in await audit_events(store) if e["method"] == "tools/call"]
    assert [(e["outcome"], e["reason"]) for e in calls] == [
        *[("error", "upstream_unavailable")] * 3,
        ("error", "upstream_failing"),
        ("ok", calls[-1]["reason"]),
    ]
