"""The data plane end to end: the official SDK client calls Bastion, Bastion calls a real upstream as the person."""

from __future__ import annotations

from typing import Any

import httpx2
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, Provisioning, ProvisionMode, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
MODES = ("legacy", "2026-07-28")


async def _enroll(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, email: str, credential: str) -> str:
    await members.create(store, operator, MemberSpec(email, email.split("@")[0]))
    await identities.create(store, vault, hasher, operator, server="crm", owner=email, secret=bearer_secret(credential))
    _c, _t, token = await connections.create(store, hasher, operator, host="agent", gateway="sales", member=email)
    return token


async def _world(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, upstream_url: str) -> dict[str, str]:
    await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=upstream_url, auth_kind=AuthKind.BEARER)
    )
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"whoami", "echo", "count"}))
    await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm", tools=tools),)))
    await hosts.create(store, operator, HostSpec("agent"))
    return {
        "ada": await _enroll(store, vault, hasher, operator, "ada@example.com", "ada-own-upstream-credential"),
        "bob": await _enroll(store, vault, hasher, operator, "bob@example.com", "bob-own-upstream-credential"),
    }


@pytest.mark.parametrize("mode", MODES)
async def test_each_person_reaches_the_upstream_with_their_own_credential(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion:
            url = f"{bastion}/g/sales/mcp"
            for person, credential in (("ada", "ada-own-upstream-credential"), ("bob", "bob-own-upstream-credential")):
                async with gateway_client(url, tokens[person], mode) as client:
                    listed = await client.list_tools()
                    assert sorted(t.name for t in listed.tools) == ["crm__count", "crm__echo", "crm__whoami"]
                    result = await client.call_tool("crm__whoami", {})
                    assert result.content[0].text == f"Bearer {credential}"  # type: ignore[union-attr]
                    echoed = await client.call_tool("crm__echo", {"text": "hi"})
                    assert echoed.content[0].text == "hi"  # type: ignore[union-attr]
    # The agent's token never reached the upstream; only the two members' own credentials did.
    seen = {a for a in recorder.authorizations if a is not None}
    assert seen == {"Bearer ada-own-upstream-credential", "Bearer bob-own-upstream-credential"}
    assert not any("bst_" in str(h) for h in recorder.other_headers)


@pytest.mark.parametrize("mode", MODES)
async def test_prompts_resources_and_progress_are_relayed(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", tokens["ada"], mode) as client,
        ):
            prompts = await client.list_prompts()
            assert [p.name for p in prompts.prompts] == ["crm__greet"]
            prompt = await client.get_prompt("crm__greet", {"name": "Ada"})
            assert prompt.messages[0].content.text == "Hello Ada"  # type: ignore[union-attr]
            resources = await client.list_resources()
            assert [str(r.uri) for r in resources.resources] == ["mem://note"]
            read = await client.read_resource("mem://note")
            assert read.contents[0].text == "note for Bearer ada-own-upstream-credential"  # type: ignore[union-attr]
            steps: list[tuple[float, float | None, str | None]] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                steps.append((progress, total, message))

            counted = await client.call_tool("crm__count", {}, progress_callback=on_progress)
            assert counted.content[0].text == "counted"  # type: ignore[union-attr]
            assert [s[0] for s in steps] == [1, 2, 3]


@pytest.mark.parametrize("mode", MODES)
async def test_hidden_and_unknown_tools_cannot_be_called(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", tokens["ada"], mode) as client,
        ):
            for name in ("crm__hidden", "crm__nope", "other__whoami", "whoami"):
                with pytest.raises(MCPError) as caught:
                    await client.call_tool(name, {})
                assert caught.value.code == types.INVALID_PARAMS
    assert all(h.get("authorization") != "hidden" for h in recorder.other_headers)


async def test_bad_tokens_and_disabled_hosts_are_refused_at_the_door(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion, httpx2.AsyncClient(base_url=bastion) as http:
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
            headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
            missing = await http.post("/g/sales/mcp", json=body, headers=headers)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
            garbled = await http.post(
                "/g/sales/mcp", json=body, headers={**headers, "Authorization": "Bearer bst_nope"}
            )
            assert garbled.status_code == 401
            elsewhere = await http.post(
                "/g/other/mcp", json=body, headers={**headers, "Authorization": f"Bearer {tokens['ada']}"}
            )
            assert elsewhere.status_code == 401
            await hosts.set_enabled(store, operator, "agent", False)
            disabled = await http.post(
                "/g/sales/mcp", json=body, headers={**headers, "Authorization": f"Bearer {tokens['ada']}"}
            )
            assert disabled.status_code == 403
            assert disabled.json()["error"] == "host_disabled"
            await hosts.set_enabled(store, operator, "agent", True)
            async with gateway_client(f"{bastion}/g/sales/mcp", tokens["ada"], "2026-07-28") as client:
                assert (await client.call_tool("crm__whoami", {})).content
    assert recorder.authorizations.count("Bearer ada-own-upstream-credential") >= 1
