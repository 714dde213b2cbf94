from __future__ import annotations

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key
from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem, caller_with

pytestmark = pytest.mark.anyio
ROLES = f"{API}/roles"


async def test_a_role_can_be_created_listed_read_edited_and_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(
        ROLES,
        json={"name": "auditor", "description": "reads the log", "capabilities": ["audit.view_export"]},
        headers=owner_headers,
    )
    assert created.status_code == 201, created.text
    role = created.json()
    assert role["capabilities"] == ["audit.view_export"] and role["builtin"] is False and role["version"] == 1
    assert created.headers["location"].endswith(f"/roles/{role['id']}")

    listed = (await client.get(ROLES, headers=owner_headers)).json()["items"]
    assert {"owner", "admin", "member", "auditor"} <= {r["name"] for r in listed}
    by_name = await client.get(f"{ROLES}/auditor", headers=owner_headers)
    assert by_name.json()["id"] == role["id"] and by_name.headers["etag"] == '"1"'

    edited = await client.patch(
        f"{ROLES}/{role['id']}", json={"capabilities": ["audit.view_export", "admin.view"]}, headers=owner_headers
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["capabilities"] == ["admin.view", "audit.view_export"]
    assert edited.headers["etag"] == '"2"'

    assert (await client.delete(f"{ROLES}/auditor", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{ROLES}/auditor", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "ok", "colour": "red"}, "colour"),
        ({"name": "Not A Slug"}, "name"),
        ({"name": "-leading"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": "ok", "description": "d" * 1001}, "description"),
        ({"name": "ok", "capabilities": ["root"]}, "capabilities"),
    ],
)
async def test_an_invalid_role_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], body: dict[str, object], field: str
) -> None:
    assert_invalid(await client.post(ROLES, json=body, headers=owner_headers), field)
    names = {r["name"] for r in (await client.get(ROLES, headers=owner_headers)).json()["items"]}
    assert names == {"owner", "admin", "member"}


async def test_a_duplicate_role_name_is_a_conflict(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    assert (await client.post(ROLES, json={"name": "ops"}, headers=owner_headers)).status_code == 201
    assert_problem(await client.post(ROLES, json={"name": "ops"}, headers=owner_headers), 409, "conflict")
    built_in = assert_problem(await client.post(ROLES, json={"name": "admin"}, headers=owner_headers), 409, "conflict")
    assert built_in["field"] == "name"
    other = (await client.post(ROLES, json={"name": "dev"}, headers=owner_headers)).json()
    assert_problem(
        await client.patch(f"{ROLES}/{other['id']}", json={"name": "ops"}, headers=owner_headers), 409, "conflict"
    )


async def test_a_missing_role_is_not_found(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    for response in (
        await client.get(f"{ROLES}/ghost", headers=owner_headers),
        await client.patch(f"{ROLES}/ghost", json={"description": "x"}, headers=owner_headers),
        await client.delete(f"{ROLES}/ghost", headers=owner_headers),
    ):
        assert_problem(response, 404, "not_found")


async def test_an_edit_with_a_stale_etag_is_refused_and_the_current_one_passes(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(ROLES, json={"name": "ops"}, headers=owner_headers)
    first = await client.patch(f"{ROLES}/ops", json={"description": "one"}, headers=owner_headers)
    stale = await client.patch(
        f"{ROLES}/ops", json={"description": "two"}, headers={**owner_headers, "If-Match": '"1"'}
    )
    assert_problem(stale, 412, "version_mismatch")
    current = await client.patch(
        f"{ROLES}/ops", json={"description": "two"}, headers={**owner_headers, "If-Match": first.headers["etag"]}
    )
    assert current.status_code == 200, current.text
    assert current.json()["description"] == "two"
    assert_invalid(
        await client.patch(f"{ROLES}/ops", json={"description": "x"}, headers={**owner_headers, "If-Match": "v1"}),
        "If-Match",
    )


async def test_roles_page_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = [(await client.post(ROLES, json={"name": f"r{i}"}, headers=owner_headers)).json()["id"] for i in range(7)]
    await assert_pages_cover(client, owner_headers, ROLES, created)


async def test_built_in_roles_cannot_be_edited_away_or_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    assert_problem(
        await client.patch(f"{ROLES}/owner", json={"capabilities": []}, headers=owner_headers), 403, "forbidden"
    )
    assert_problem(await client.delete(f"{ROLES}/admin", headers=owner_headers), 403, "forbidden")
    renamed = await client.patch(f"{ROLES}/admin", json={"name": "boss"}, headers=owner_headers)
    assert assert_problem(renamed, 409, "conflict")["field"] == "name"


async def test_a_role_still_held_cannot_be_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    await client.post(ROLES, json={"name": "ops"}, headers=owner_headers)
    await member_with_key(store, hasher, operator, "ops@example.com", "ops")
    assert_problem(await client.delete(f"{ROLES}/ops", headers=owner_headers), 409, "conflict")
    assert (await client.get(f"{ROLES}/ops", headers=owner_headers)).status_code == 200


async def test_a_role_manager_cannot_grant_capabilities_they_lack(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    manager = await caller_with(store, hasher, operator, "rm@example.com", {Capability.ROLES_MANAGE})
    assert_problem(
        await client.post(ROLES, json={"name": "servers", "capabilities": ["servers.manage"]}, headers=manager),
        403,
        "forbidden",
    )
    assert (await client.get(f"{ROLES}/servers", headers=owner_headers)).status_code == 404

    me = (await client.get(f"{API}/me", headers=manager)).json()
    widened = await client.patch(
        f"{ROLES}/{me['role']['id']}", json={"capabilities": ["roles.manage", "members.manage"]}, headers=manager
    )
    assert_problem(widened, 403, "forbidden")
    assert_problem(
        await client.patch(f"{ROLES}/member", json={"capabilities": ["servers.manage"]}, headers=manager),
        403,
        "forbidden",
    )
    assert (await client.get(f"{API}/me", headers=manager)).json()["role"]["capabilities"] == ["roles.manage"]
    # What they hold, they may hand out.
    assert (
        await client.post(ROLES, json={"name": "helpers", "capabilities": ["roles.manage"]}, headers=manager)
    ).status_code == 201
