"""Server URLs on create and update: what no outbound setting could allow is refused as a field error at once."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_network
from typing import Any

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import AuthKind, OAuthClientSettings, OAuthRegistration, Transport
from bastion.domain.specs import HostSpec, ServerSpec
from bastion.net.outbound import OutboundPolicy, UrlRefused, check_url_shape
from bastion.services import hosts, servers, webhooks
from tests.web.support import API, assert_problem

pytestmark = pytest.mark.anyio
SERVERS = f"{API}/servers"


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("javascript:alert(1)", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("http://mcp.example.com/mcp", "scheme"),
        ("http://10.0.0.5/mcp", "scheme"),
        ("https://user:pw@mcp.example.com/", "userinfo"),
        ("https://1.2.3.4.5/", "syntax"),
        ("https://mcp.example.com:0/", "port"),
    ],
)
def test_the_shape_check_refuses_what_no_setting_allows(url: str, rule: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        check_url_shape(url, field="url")
    assert refused.value.rule == rule
    assert refused.value.field == "url"


@pytest.mark.parametrize(
    "url",
    ["https://mcp.example.com/mcp", "http://127.0.0.1:8080/mcp", "http://localhost:3000/", "https://10.0.0.5/mcp"],
)
def test_the_shape_check_leaves_addresses_to_the_settings(url: str) -> None:
    # Loopback and private addresses may be allowed by BASTION_OUTBOUND_*: the connection decides.
    assert check_url_shape(url) == url


async def test_the_service_refuses_a_plain_http_upstream_off_loopback(store: Store, operator: Actor) -> None:
    with pytest.raises(UrlRefused) as refused:
        await servers.create(store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url="http://crm.example/"))
    assert refused.value.field == "url"
    assert "use https" in refused.value.detail


async def test_the_api_answers_a_refused_url_with_a_problem_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(
        SERVERS, json={"name": "crm", "transport": "sse", "url": "http://crm.example/sse"}, headers=owner_headers
    )
    problem = assert_problem(created, 422, "url_refused")
    assert problem["field"] == "url"
    assert "refused by the outbound URL policy" in problem["detail"]

    fine = await client.post(
        SERVERS, json={"name": "crm", "transport": "sse", "url": "https://crm.example/sse"}, headers=owner_headers
    )
    assert fine.status_code == 201, fine.text
    edited = await client.patch(f"{SERVERS}/crm", json={"url": "http://crm.example/sse"}, headers=owner_headers)
    assert assert_problem(edited, 422, "url_refused")["field"] == "url"
    assert (await client.get(f"{SERVERS}/crm", headers=owner_headers)).json()["url"] == "https://crm.example/sse"


INTERNAL_SPELLINGS = [
    "https://169.254.169.254/latest",  # cloud metadata
    "https://[::ffff:169.254.169.254]/",  # the same, inside IPv6
    "https://0251.0376.0251.0376/",  # the same, in octal
    "https://10.0.0.5/mcp",  # private
    "https://017700000001/",  # loopback as one octal number
    "https://2130706433/",  # loopback as one decimal number
    "https://0x7f000001/",  # loopback in hex
]


@pytest.mark.parametrize("url", INTERNAL_SPELLINGS)
async def test_registration_refuses_every_address_a_connection_would_refuse(
    url: str, store: Store, operator: Actor, vault: Any
) -> None:
    """A server URL, an OAuth authorization server, a host's webhook URL and a webhook endpoint: each refused as
    a field error when registered, by the install's own policy (strict here: no loopback, no allowed networks)."""
    store.outbound = OutboundPolicy  # the strictest policy: no loopback, no allowed networks
    with pytest.raises(UrlRefused) as refused:
        await servers.create(store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=url))
    assert refused.value.field == "url"
    oauth = OAuthClientSettings(OAuthRegistration.AUTO, authorization_server=url)
    spec = ServerSpec("crm", Transport.STREAMABLE_HTTP, url="https://crm.example/mcp", auth_kind=AuthKind.OAUTH)
    with pytest.raises(UrlRefused) as refused:
        await servers.create(store, operator, replace(spec, oauth=oauth))
    assert refused.value.field == "oauth.authorization_server"
    with pytest.raises(UrlRefused) as refused:
        await hosts.create(store, operator, HostSpec("agent", webhook_url=url))
    assert refused.value.field == "webhook_url"
    await hosts.create(store, operator, HostSpec("agent"))
    with pytest.raises(UrlRefused):
        await webhooks.create_endpoint(store, vault, operator, "agent", url=url)
    # Nothing was kept.
    assert [h.name for h in (await hosts.list_page(store, operator)).items] == ["agent"]
    assert (await servers.list_page(store, operator)).items == []


async def test_a_network_the_admin_allowed_registers_and_an_http_authorization_server_does_not(
    store: Store, operator: Actor
) -> None:
    store.outbound = lambda: OutboundPolicy(allowed_networks=(ip_network("10.0.0.0/8"),))
    await servers.create(store, operator, ServerSpec("internal", Transport.STREAMABLE_HTTP, url="https://10.0.0.5/mcp"))
    oauth = OAuthClientSettings(OAuthRegistration.AUTO, authorization_server="http://as.example.com")
    spec = ServerSpec("crm", Transport.STREAMABLE_HTTP, url="https://crm.example/mcp", auth_kind=AuthKind.OAUTH)
    with pytest.raises(UrlRefused) as refused:
        await servers.create(store, operator, replace(spec, oauth=oauth))
    assert refused.value.field == "oauth.authorization_server" and "use https" in refused.value.detail
