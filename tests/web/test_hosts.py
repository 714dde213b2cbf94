from __future__ import annotations

import httpx2
import pytest

from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem

pytestmark = pytest.mark.anyio
HOSTS = f"{API}/hosts"


async def test_a_host_can_be_created_listed_read_edited_and_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(
        HOSTS, json={"name": "sales-agent", "webhook_url": "https://agent.example/hook"}, headers=owner_headers
    )
    assert created.status_code == 201, created.text
    host = created.json()
    assert host["kind"] == "token" and host["enabled"] is True and host["disabled_at"] is None
    assert [h["id"] for h in (await client.get(HOSTS, headers=owner_headers)).json()["items"]] == [host["id"]]
    edited = await client.patch(
        f"{HOSTS}/sales-agent", json={"webhook_url": None, "description": "CRM bot"}, headers=owner_headers
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["webhook_url"] is None and edited.json()["description"] == "CRM bot"
    assert (await client.delete(f"{HOSTS}/{host['id']}", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{HOSTS}/sales-agent", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "ok", "owner": "me"}, "owner"),
        ({"name": "Sales Agent"}, "name"),
        ({"name": "h" * 64}, "name"),
        ({"name": "ok", "webhook_url": "ftp://agent.example/hook"}, "webhook_url"),
        ({"name": "ok", "webhook_url": "javascript:alert(1)"}, "webhook_url"),
        ({"name": "ok", "webhook_url": "https://agent.example/" + "a" * 2048}, "webhook_url"),
        ({"name": "ok", "description": "d" * 1001}, "description"),
    ],
)
async def test_an_invalid_host_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], body: dict[str, object], field: str
) -> None:
    assert_invalid(await client.post(HOSTS, json=body, headers=owner_headers), field)
    assert (await client.get(HOSTS, headers=owner_headers)).json()["items"] == []


async def test_a_duplicate_host_name_is_a_conflict(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    await client.post(HOSTS, json={"name": "a"}, headers=owner_headers)
    assert_problem(await client.post(HOSTS, json={"name": "a"}, headers=owner_headers), 409, "conflict")
    await client.post(HOSTS, json={"name": "b"}, headers=owner_headers)
    assert_problem(await client.patch(f"{HOSTS}/b", json={"name": "a"}, headers=owner_headers), 409, "conflict")


async def test_a_missing_host_is_not_found(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    for response in (
        await client.get(f"{HOSTS}/ghost", headers=owner_headers),
        await client.patch(f"{HOSTS}/ghost", json={"description": "x"}, headers=owner_headers),
        await client.post(f"{HOSTS}/ghost/disable", headers=owner_headers),
        await client.delete(f"{HOSTS}/ghost", headers=owner_headers),
    ):
        assert_problem(response, 404, "not_found")


async def test_an_edit_with_a_stale_etag_is_refused_and_the_current_one_passes(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(HOSTS, json={"name": "a"}, headers=owner_headers)
    await client.patch(f"{HOSTS}/a", json={"description": "one"}, headers=owner_headers)
    stale = {**owner_headers, "If-Match": created.headers["etag"]}
    assert_problem(
        await client.patch(f"{HOSTS}/a", json={"description": "two"}, headers=stale), 412, "version_mismatch"
    )
    assert_problem(await client.post(f"{HOSTS}/a/disable", headers=stale), 412, "version_mismatch")
    assert (await client.get(f"{HOSTS}/a", headers=owner_headers)).json()["enabled"] is True
    ok = await client.patch(f"{HOSTS}/a", json={"description": "two"}, headers={**owner_headers, "If-Match": '"2"'})
    assert ok.status_code == 200 and ok.headers["etag"] == '"3"'


async def test_disabling_a_host_keeps_it_and_records_who_and_when_until_enabled(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(HOSTS, json={"name": "a"}, headers=owner_headers)
    me = (await client.get(f"{API}/me", headers=owner_headers)).json()["member"]["id"]
    disabled = await client.post(f"{HOSTS}/a/disable", headers=owner_headers)
    assert disabled.status_code == 200, disabled.text
    host = disabled.json()
    assert host["enabled"] is False and host["disabled_by"] == me and host["disabled_at"] is not None
    assert [
        h["name"] for h in (await client.get(HOSTS, params={"enabled": False}, headers=owner_headers)).json()["items"]
    ] == ["a"]
    again = await client.post(f"{HOSTS}/a/disable", headers={**owner_headers, "If-Match": disabled.headers["etag"]})
    assert again.status_code == 200 and again.json()["disabled_at"] == host["disabled_at"]

    enabled = await client.post(f"{HOSTS}/a/enable", headers=owner_headers)
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["enabled"] is True
    assert enabled.json()["disabled_at"] is None and enabled.json()["disabled_by"] is None
    assert enabled.json()["id"] == host["id"]
    assert (await client.get(HOSTS, params={"enabled": False}, headers=owner_headers)).json()["items"] == []


async def test_hosts_page_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = [(await client.post(HOSTS, json={"name": f"h{i}"}, headers=owner_headers)).json()["id"] for i in range(7)]
    await assert_pages_cover(client, owner_headers, HOSTS, created)
