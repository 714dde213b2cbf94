"""Server URLs on create and update: what no outbound setting could allow is refused as a field error at once."""

from __future__ import annotations

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import ServerSpec
from bastion.net.outbound import UrlRefused, check_url_shape
from bastion.services import servers
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
