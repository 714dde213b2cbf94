"""The outbound policy on the upstream side: a loopback upstream is reached only when the settings opt in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Provisioning, ProvisionMode, Server, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.net.outbound import OutboundPolicy
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.types import ServerId, WorkspaceId
from bastion.upstream.pool import UpstreamPool, UpstreamUnavailable
from bastion.upstream.transports import Credential
from bastion.web.app import create_app
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving
from tests.net.support import StubResolver

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def _world(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, upstream_url: str) -> str:
    await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=upstream_url, auth_kind=AuthKind.BEARER)
    )
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"whoami"}))
    await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm", tools=tools),)))
    await hosts.create(store, operator, HostSpec("agent"))
    await members.create(store, operator, MemberSpec("ada@example.com", "ada"))
    await identities.create(
        store, vault, hasher, operator, server="crm", owner="ada@example.com", secret=bearer_secret("ada-credential")
    )
    _c, _t, token = await connections.create(
        store, hasher, operator, host="agent", gateway="sales", member="ada@example.com"
    )
    return token


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_loopback_upstream_is_refused_without_the_opt_in(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    strict = settings.model_copy(update={"outbound_allow_loopback": False})
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        token = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(strict, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", token, mode) as client,
        ):
            with pytest.raises(MCPError) as caught:
                await client.call_tool("crm__whoami", {})
    assert caught.value.code == -32052
    assert "refused by the outbound URL policy" in caught.value.message
    assert "loopback" in caught.value.message
    assert "BASTION_OUTBOUND_ALLOW_LOOPBACK" in caught.value.message
    assert recorder.authorizations == []  # not one request reached the upstream


async def test_the_same_upstream_is_reached_with_the_opt_in(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    assert settings.outbound_allow_loopback  # the test settings opt in explicitly
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        token = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", token, "2026-07-28") as client,
        ):
            result = await client.call_tool("crm__whoami", {})
    assert result.content[0].text == "Bearer ada-credential"  # type: ignore[union-attr]


def _server(url: str, transport: Transport) -> Server:
    now = datetime.now(UTC)
    return Server(
        id=ServerId("srv_rebind"),
        workspace_id=WorkspaceId("ws"),
        name="crm",
        description="",
        transport=transport,
        url=url,
        command=None,
        args=(),
        env={},
        auth_kind=AuthKind.NONE,
        oauth=None,
        era=ProtocolEra.LEGACY if transport is Transport.SSE else ProtocolEra.AUTO,
        connect_timeout_s=5.0,
        call_timeout_s=10.0,
        version=1,
        created_at=now,
        updated_at=now,
    )


@pytest.mark.parametrize("transport", [Transport.STREAMABLE_HTTP, Transport.SSE])
async def test_an_upstream_name_that_rebinds_after_the_early_check_is_refused_when_connecting(
    transport: Transport,
) -> None:
    # The early check sees 127.0.0.1 (allowed with the opt-in); the connection's own lookup sees 10.0.0.1.
    resolver = StubResolver(localhost=[["127.0.0.1"], ["10.0.0.1"]])
    pool = UpstreamPool(outbound=OutboundPolicy(allow_loopback=True, resolver=resolver))
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream, pool.running():
        url = upstream.replace("127.0.0.1", "localhost") + (
            "/mcp" if transport is Transport.STREAMABLE_HTTP else "/sse"
        )
        with pytest.raises(UpstreamUnavailable) as caught:
            await pool.client(_server(url, transport), Credential(None))
    assert "refused by the outbound URL policy" in caught.value.detail
    assert "resolves to 10.0.0.1" in caught.value.detail
    assert resolver.lookups == ["localhost", "localhost"]
    assert recorder.authorizations == []
