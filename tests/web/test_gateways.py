from __future__ import annotations

from typing import Any

import httpx2
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem, assert_unknown

pytestmark = pytest.mark.anyio
GATEWAYS = f"{API}/gateways"


@pytest.fixture
async def with_servers(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> dict[str, str]:
    for name in ("github", "jira"):
        created = await client.post(
            f"{API}/servers",
            json={"name": name, "transport": "streamable_http", "url": f"https://{name}.example/"},
            headers=owner_headers,
        )
        assert created.status_code == 201, created.text
    return owner_headers


async def _count(store: Store, table: sa.Table) -> int:
    async with store.transaction() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_a_gateway_can_be_created_listed_read_edited_and_deleted(
    client: httpx2.AsyncClient, with_servers: dict[str, str]
) -> None:
    headers = with_servers
    body = {
        "slug": "engineering",
        "name": "Engineering",
        "servers": [
            {"server": "github", "tools": {"mode": "allow_selected", "selected": ["create_issue", "search"]}},
            {"server": "github", "alias": "github-ro", "prompts": {"mode": "block_all"}},
        ],
    }
    created = await client.post(GATEWAYS, json=body, headers=headers)
    assert created.status_code == 201, created.text
    gateway = created.json()
    assert gateway["url_path"] == "/g/engineering/mcp" and gateway["enabled"] is True
    assert [s["alias"] for s in gateway["servers"]] == ["github", "github-ro"]
    assert gateway["servers"][0]["tools"] == {"mode": "allow_selected", "selected": ["create_issue", "search"]}

    assert [g["slug"] for g in (await client.get(GATEWAYS, headers=headers)).json()["items"]] == ["engineering"]
    assert (await client.get(f"{GATEWAYS}/{gateway['id']}", headers=headers)).json()["slug"] == "engineering"

    edited = await client.patch(
        f"{GATEWAYS}/engineering", json={"enabled": False, "servers": [{"server": "jira"}]}, headers=headers
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["enabled"] is False
    assert [s["server"] for s in edited.json()["servers"]] == ["jira"]

    assert (await client.delete(f"{GATEWAYS}/engineering", headers=headers)).status_code == 204
    assert_problem(await client.get(f"{GATEWAYS}/engineering", headers=headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"slug": "ok", "region": "eu"}, "region"),
        ({"slug": "ok", "servers": [{"server": "github", "colour": "red"}]}, "servers.0.colour"),
        ({"slug": "Not_A_Slug"}, "slug"),
        ({"slug": "s" * 64}, "slug"),
        ({"slug": "ok", "name": "n" * 201}, "name"),
        ({"slug": "ok", "servers": [{"server": "github"}, {"server": "github"}]}, "servers[1].alias"),
        (
            {"slug": "ok", "servers": [{"server": "github", "identity_scheme": "shared"}]},
            "servers[0].shared_identity_id",
        ),
        (
            {"slug": "ok", "servers": [{"server": "github", "tools": {"mode": "allow_all", "selected": ["x"]}}]},
            "servers[0].tools",
        ),
    ],
)
async def test_an_invalid_gateway_is_refused_naming_the_field(
    client: httpx2.AsyncClient, with_servers: dict[str, str], store: Store, body: dict[str, Any], field: str
) -> None:
    assert_invalid(await client.post(GATEWAYS, json=body, headers=with_servers), field)
    assert await _count(store, schema.gateways) == 0


async def test_a_gateway_naming_an_unknown_server_leaves_nothing_behind(
    client: httpx2.AsyncClient, with_servers: dict[str, str], store: Store
) -> None:
    body = {"slug": "eng", "servers": [{"server": "github"}, {"server": "ghost"}]}
    assert_unknown(await client.post(GATEWAYS, json=body, headers=with_servers), "servers[1].server")
    assert await _count(store, schema.gateways) == 0
    assert await _count(store, schema.gateway_servers) == 0

    await client.post(GATEWAYS, json={"slug": "eng", "servers": [{"server": "github"}]}, headers=with_servers)
    broken = await client.patch(
        f"{GATEWAYS}/eng",
        json={"name": "Renamed", "servers": [{"server": "jira"}, {"server": "ghost"}]},
        headers=with_servers,
    )
    assert_unknown(broken, "servers[1].server")
    after = (await client.get(f"{GATEWAYS}/eng", headers=with_servers)).json()
    assert [s["server"] for s in after["servers"]] == ["github"]
    assert after["name"] == "eng" and after["version"] == 1
    assert await _count(store, schema.gateway_servers) == 1


async def test_a_duplicate_slug_is_a_conflict(client: httpx2.AsyncClient, with_servers: dict[str, str]) -> None:
    await client.post(GATEWAYS, json={"slug": "eng"}, headers=with_servers)
    assert_problem(await client.post(GATEWAYS, json={"slug": "eng"}, headers=with_servers), 409, "conflict")
    await client.post(GATEWAYS, json={"slug": "ops"}, headers=with_servers)
    assert_problem(await client.patch(f"{GATEWAYS}/ops", json={"slug": "eng"}, headers=with_servers), 409, "conflict")


async def test_a_missing_gateway_is_not_found(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    for response in (
        await client.get(f"{GATEWAYS}/ghost", headers=owner_headers),
        await client.patch(f"{GATEWAYS}/ghost", json={"description": "x"}, headers=owner_headers),
        await client.delete(f"{GATEWAYS}/ghost", headers=owner_headers),
    ):
        assert_problem(response, 404, "not_found")


async def test_an_edit_with_a_stale_etag_is_refused_and_the_current_one_passes(
    client: httpx2.AsyncClient, with_servers: dict[str, str]
) -> None:
    created = await client.post(GATEWAYS, json={"slug": "eng"}, headers=with_servers)
    await client.patch(f"{GATEWAYS}/eng", json={"description": "one"}, headers=with_servers)
    stale = await client.patch(
        f"{GATEWAYS}/eng", json={"enabled": False}, headers={**with_servers, "If-Match": created.headers["etag"]}
    )
    assert_problem(stale, 412, "version_mismatch")
    assert (await client.get(f"{GATEWAYS}/eng", headers=with_servers)).json()["enabled"] is True
    current = (await client.get(f"{GATEWAYS}/eng", headers=with_servers)).headers["etag"]
    ok = await client.patch(f"{GATEWAYS}/eng", json={"enabled": False}, headers={**with_servers, "If-Match": current})
    assert ok.status_code == 200 and ok.json()["enabled"] is False


async def test_gateways_page_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, with_servers: dict[str, str]
) -> None:
    created = [
        (
            await client.post(GATEWAYS, json={"slug": f"g{i}", "servers": [{"server": "github"}]}, headers=with_servers)
        ).json()["id"]
        for i in range(7)
    ]
    await assert_pages_cover(client, with_servers, GATEWAYS, created)
