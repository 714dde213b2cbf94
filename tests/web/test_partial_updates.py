"""PATCH bodies: a field left out keeps its value; `null` clears a clearable field and is refused for any other."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, RoleSpec, ServerSpec
from bastion.services import gateways, hosts, identities, members, roles, servers
from bastion.services.apikeys import KeyHasher
from tests.web.support import API, assert_invalid

pytestmark = pytest.mark.anyio


@pytest.fixture
async def targets(store: Store, vault: Any, hasher: KeyHasher, operator: Actor) -> dict[str, str]:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, "https://bq.example.com/mcp"))
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("sales-agent", webhook_url="https://agent.example/hook"))
    await roles.create(store, operator, RoleSpec("auditor"))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    identity = await identities.create(
        store, vault, hasher, operator, server="bq", shared=True, secret=bearer_secret("workspace-credential-1")
    )
    return {"identity": identity.id}


REFUSED = [
    ("members/ada@example.com", "name"),
    ("members/ada@example.com", "email"),
    ("members/ada@example.com", "role"),
    ("members/ada@example.com", "status"),
    ("roles/auditor", "name"),
    ("roles/auditor", "description"),
    ("roles/auditor", "capabilities"),
    ("servers/bq", "name"),
    ("servers/bq", "transport"),
    ("servers/bq", "description"),
    ("servers/bq", "connect_timeout_s"),
    ("gateways/analytics", "slug"),
    ("gateways/analytics", "name"),
    ("gateways/analytics", "enabled"),
    ("gateways/analytics", "servers"),
    ("hosts/sales-agent", "name"),
    ("hosts/sales-agent", "description"),
    ("identities/{identity}", "label"),
    ("identities/{identity}", "status"),
]


@pytest.mark.parametrize(("path", "field"), REFUSED, ids=[f"{p.split('/')[0]}-{f}" for p, f in REFUSED])
async def test_null_for_a_field_that_cannot_be_cleared_is_refused_naming_it(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], targets: dict[str, str], path: str, field: str
) -> None:
    url = f"{API}/{path.format(**targets)}"
    before = (await client.get(url, headers=owner_headers)).json()
    assert_invalid(await client.patch(url, json={field: None}, headers=owner_headers), field)
    assert (await client.get(url, headers=owner_headers)).json() == before


async def test_null_clears_the_fields_that_may_be_cleared(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], targets: dict[str, str]
) -> None:
    host = await client.patch(f"{API}/hosts/sales-agent", json={"webhook_url": None}, headers=owner_headers)
    assert host.status_code == 200, host.text
    assert host.json()["webhook_url"] is None
    stdio = await client.patch(
        f"{API}/servers/bq",
        json={"transport": "stdio", "url": None, "command": "uvx", "args": ["mcp-server"]},
        headers=owner_headers,
    )
    assert stdio.status_code == 200, stdio.text
    assert stdio.json()["url"] is None
    cleared = await client.patch(f"{API}/servers/bq", json={"args": None}, headers=owner_headers)
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["args"] == []
    relabelled = await client.patch(
        f"{API}/identities/{targets['identity']}", json={"label": "wiki", "token": None}, headers=owner_headers
    )
    assert relabelled.status_code == 200 and relabelled.json()["label"] == "wiki"


async def test_a_field_left_out_keeps_its_value(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], targets: dict[str, str]
) -> None:
    edited = await client.patch(f"{API}/hosts/sales-agent", json={"description": "CRM"}, headers=owner_headers)
    assert edited.status_code == 200, edited.text
    assert edited.json()["webhook_url"] == "https://agent.example/hook" and edited.json()["name"] == "sales-agent"
