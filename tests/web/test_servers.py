from __future__ import annotations

from typing import Any

import httpx2
import pytest

from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem

pytestmark = pytest.mark.anyio
SERVERS = f"{API}/servers"
HTTP_SERVER: dict[str, Any] = {"name": "github", "transport": "streamable_http", "url": "https://mcp.github.example/"}


async def test_a_server_can_be_created_listed_read_edited_and_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)
    assert created.status_code == 201, created.text
    server = created.json()
    assert server["auth_kind"] == "none" and server["era"] == "auto" and server["connect_timeout_s"] == 5.0
    stdio = await client.post(
        SERVERS,
        json={
            "name": "files",
            "transport": "stdio",
            "command": "mcp-files",
            "args": ["--root", "/srv"],
            "env": {"LOG_LEVEL": "info"},
        },
        headers=owner_headers,
    )
    assert stdio.status_code == 201, stdio.text
    assert stdio.json()["args"] == ["--root", "/srv"] and stdio.json()["url"] is None

    only_stdio = await client.get(SERVERS, params={"transport": "stdio"}, headers=owner_headers)
    assert [s["name"] for s in only_stdio.json()["items"]] == ["files"]
    assert (await client.get(f"{SERVERS}/github", headers=owner_headers)).json()["id"] == server["id"]

    edited = await client.patch(
        f"{SERVERS}/github",
        json={
            "auth_kind": "oauth",
            "oauth": {"registration": "pre_registered", "client_id": "bastion", "scopes": ["repo"]},
        },
        headers=owner_headers,
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["oauth"]["client_id"] == "bastion" and edited.json()["version"] == 2

    assert (await client.delete(f"{SERVERS}/github", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{SERVERS}/github", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"name": "has space"}, "name"),
        ({"name": "a__b"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"url": "ftp://mcp.example.com/"}, "url"),
        ({"url": "javascript:alert(1)"}, "url"),
        ({"url": "file:///etc/passwd"}, "url"),
        ({"url": "https://user:pw@mcp.example.com/"}, "url"),
        ({"url": "https://example.com/" + "a" * 2048}, "url"),
        ({"url": None}, "url"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"oauth": {"registration": "dynamic"}}, "oauth"),
        ({"auth_kind": "oauth", "oauth": {"registration": "pre_registered"}}, "oauth.client_id"),
        ({"auth_kind": "oauth", "oauth": {"authorization_server": "javascript:x"}}, "oauth.authorization_server"),
    ],
)
async def test_an_invalid_server_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], changes: dict[str, Any], field: str
) -> None:
    assert_invalid(await client.post(SERVERS, json={**HTTP_SERVER, **changes}, headers=owner_headers), field)
    assert (await client.get(SERVERS, headers=owner_headers)).json()["items"] == []


async def test_an_edit_that_breaks_a_server_is_refused_and_leaves_it_as_it_was(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)
    assert_invalid(await client.patch(f"{SERVERS}/github", json={"url": "ftp://x/"}, headers=owner_headers), "url")
    assert_invalid(
        await client.patch(f"{SERVERS}/github", json={"transport": "stdio"}, headers=owner_headers), "command"
    )
    after = (await client.get(f"{SERVERS}/github", headers=owner_headers)).json()
    assert after["url"] == HTTP_SERVER["url"] and after["version"] == 1


async def test_an_edit_that_fits_alone_but_not_a_setting_it_leaves_is_a_conflict_naming_that_setting(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(SERVERS, json={**HTTP_SERVER, "auth_kind": "oauth"}, headers=owner_headers)
    to_stdio = {"transport": "stdio", "command": "github-mcp"}
    refused = await client.patch(f"{SERVERS}/github", json=to_stdio, headers=owner_headers)
    assert assert_problem(refused, 409, "conflict")["field"] == "auth_kind"
    after = (await client.get(f"{SERVERS}/github", headers=owner_headers)).json()
    assert (after["transport"], after["auth_kind"], after["version"]) == ("streamable_http", "oauth", 1)
    moved = await client.patch(f"{SERVERS}/github", json={**to_stdio, "auth_kind": "bearer"}, headers=owner_headers)
    assert moved.status_code == 200, moved.text
    assert (moved.json()["url"], moved.json()["oauth"]) == (None, None)


async def test_a_server_moves_between_streamable_http_and_sse_keeping_its_url(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)
    for transport in ("sse", "streamable_http"):
        moved = await client.patch(f"{SERVERS}/github", json={"transport": transport}, headers=owner_headers)
        assert moved.status_code == 200, moved.text
        assert (moved.json()["transport"], moved.json()["url"]) == (transport, HTTP_SERVER["url"])


async def test_a_duplicate_server_name_is_a_conflict(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)
    assert_problem(await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers), 409, "conflict")
    await client.post(SERVERS, json={**HTTP_SERVER, "name": "gitlab"}, headers=owner_headers)
    assert_problem(
        await client.patch(f"{SERVERS}/gitlab", json={"name": "github"}, headers=owner_headers), 409, "conflict"
    )


async def test_a_missing_server_is_not_found(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    for response in (
        await client.get(f"{SERVERS}/ghost", headers=owner_headers),
        await client.patch(f"{SERVERS}/ghost", json={"description": "x"}, headers=owner_headers),
        await client.delete(f"{SERVERS}/ghost", headers=owner_headers),
    ):
        assert_problem(response, 404, "not_found")


async def test_an_edit_with_a_stale_etag_is_refused_and_the_current_one_passes(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)
    await client.patch(f"{SERVERS}/github", json={"description": "one"}, headers=owner_headers)
    stale = await client.patch(
        f"{SERVERS}/github", json={"description": "two"}, headers={**owner_headers, "If-Match": created.headers["etag"]}
    )
    assert_problem(stale, 412, "version_mismatch")
    ok = await client.patch(
        f"{SERVERS}/github", json={"description": "two"}, headers={**owner_headers, "If-Match": 'W/"2"'}
    )
    assert ok.status_code == 200 and ok.headers["etag"] == '"3"'


async def test_servers_page_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = [
        (await client.post(SERVERS, json={**HTTP_SERVER, "name": f"s{i}"}, headers=owner_headers)).json()["id"]
        for i in range(7)
    ]
    await assert_pages_cover(client, owner_headers, SERVERS, created)
    assert_invalid(await client.get(SERVERS, params={"limit": 0}, headers=owner_headers), "limit")
    assert_invalid(await client.get(SERVERS, params={"limit": 201}, headers=owner_headers), "limit")


async def test_a_server_a_gateway_uses_cannot_be_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)
    gateway = await client.post(
        f"{API}/gateways", json={"slug": "dev", "servers": [{"server": "github"}]}, headers=owner_headers
    )
    assert gateway.status_code == 201, gateway.text
    assert_problem(await client.delete(f"{SERVERS}/github", headers=owner_headers), 409, "conflict")
    assert (await client.get(f"{SERVERS}/github", headers=owner_headers)).status_code == 200
    assert (await client.get(f"{API}/gateways/dev", headers=owner_headers)).json()["servers"][0]["server"] == "github"
    await client.delete(f"{API}/gateways/dev", headers=owner_headers)
    assert (await client.delete(f"{SERVERS}/github", headers=owner_headers)).status_code == 204


async def test_a_stdio_server_s_token_env_is_set_read_changed_and_cleared(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(
        SERVERS,
        json={
            "name": "gh",
            "transport": "stdio",
            "command": "npx",
            "args": ["-y", "@modelcontextprotocol/server-github"],
            "env": {"GITHUB_TOOLSETS": "repos"},
            "auth_kind": "bearer",
            "token_env": "GITHUB_PERSONAL_ACCESS_TOKEN",
        },
        headers=owner_headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["token_env"] == "GITHUB_PERSONAL_ACCESS_TOKEN"
    assert (await client.get(f"{SERVERS}/gh", headers=owner_headers)).json()["token_env"] == (
        "GITHUB_PERSONAL_ACCESS_TOKEN"
    )
    # A patch that does not name token_env keeps it.
    described = await client.patch(f"{SERVERS}/gh", json={"description": "GitHub"}, headers=owner_headers)
    assert described.json()["token_env"] == "GITHUB_PERSONAL_ACCESS_TOKEN"
    changed = await client.patch(f"{SERVERS}/gh", json={"token_env": "GH_TOKEN"}, headers=owner_headers)
    assert changed.status_code == 200, changed.text
    assert changed.json()["token_env"] == "GH_TOKEN"
    cleared = await client.patch(f"{SERVERS}/gh", json={"token_env": None}, headers=owner_headers)
    assert cleared.status_code == 200, cleared.text
    assert (cleared.json()["token_env"], cleared.json()["version"]) == (None, 4)
    http = (await client.post(SERVERS, json=HTTP_SERVER, headers=owner_headers)).json()
    assert http["token_env"] is None


async def test_a_token_env_that_cannot_carry_the_token_is_refused_naming_token_env(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    stdio: dict[str, Any] = {"name": "gh", "transport": "stdio", "command": "npx", "env": {"GH_HOST": "github.com"}}
    for body in (
        {**HTTP_SERVER, "token_env": "GITHUB_TOKEN"},
        {**stdio, "token_env": "GITHUB-TOKEN"},
        {**stdio, "token_env": "LD_PRELOAD"},
        {**stdio, "token_env": "GH_HOST"},
        {**stdio, "token_env": ""},
        {**stdio, "token_env": "T" * 65},
    ):
        assert_invalid(await client.post(SERVERS, json=body, headers=owner_headers), "token_env")
    assert (await client.get(SERVERS, headers=owner_headers)).json()["items"] == []
    await client.post(SERVERS, json={**stdio, "token_env": "GITHUB_TOKEN"}, headers=owner_headers)
    # Putting the variable in env while token_env names it conflicts with the stored setting: refused, nothing changed.
    clash = {"env": {"GITHUB_TOKEN": "x"}}
    conflict = assert_problem(await client.patch(f"{SERVERS}/gh", json=clash, headers=owner_headers), 409, "conflict")
    assert conflict["field"] == "token_env"
    after = (await client.get(f"{SERVERS}/gh", headers=owner_headers)).json()
    assert (after["token_env"], after["env"], after["version"]) == ("GITHUB_TOKEN", {"GH_HOST": "github.com"}, 1)
    # Becoming an HTTP server drops what only stdio has, token_env included: the token then goes in a header.
    to_http = {"transport": "streamable_http", "url": HTTP_SERVER["url"]}
    moved = await client.patch(f"{SERVERS}/gh", json=to_http, headers=owner_headers)
    assert moved.status_code == 200, moved.text
    assert (moved.json()["token_env"], moved.json()["command"], moved.json()["args"]) == (None, None, [])
