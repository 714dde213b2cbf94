from __future__ import annotations

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key
from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem, assert_unknown, caller_with

pytestmark = pytest.mark.anyio
MEMBERS = f"{API}/members"


async def _role_id(client: httpx2.AsyncClient, headers: dict[str, str], name: str) -> str:
    role_id: str = (await client.get(f"{API}/roles/{name}", headers=headers)).json()["id"]
    return role_id


async def test_a_member_can_be_created_listed_read_edited_and_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(MEMBERS, json={"email": "Ada@Example.com", "name": "Ada"}, headers=owner_headers)
    assert created.status_code == 201, created.text
    ada = created.json()
    assert ada["email"] == "ada@example.com" and ada["status"] == "active"
    assert ada["role_id"] == await _role_id(client, owner_headers, "member")

    listed = (await client.get(MEMBERS, headers=owner_headers)).json()["items"]
    assert {m["email"] for m in listed} == {"owner@example.com", "ada@example.com"}
    assert (await client.get(f"{MEMBERS}/ada@example.com", headers=owner_headers)).json()["id"] == ada["id"]

    edited = await client.patch(
        f"{MEMBERS}/{ada['id']}", json={"name": "Ada L.", "role": "admin"}, headers=owner_headers
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["name"] == "Ada L." and edited.json()["role_id"] == await _role_id(
        client, owner_headers, "admin"
    )
    disabled = await client.get(MEMBERS, params={"status": "disabled"}, headers=owner_headers)
    assert disabled.json()["items"] == []

    assert (await client.delete(f"{MEMBERS}/{ada['id']}", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{MEMBERS}/{ada['id']}", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "a@example.com", "name": "A", "nickname": "x"}, "nickname"),
        ({"email": "not-an-email", "name": "A"}, "email"),
        ({"email": "a@example.com", "name": "n" * 201}, "name"),
        ({"email": "a@example.com", "name": "   "}, "name"),
        ({"email": "a@" + "e" * 250 + ".com", "name": "A"}, "email"),
        ({"email": "a@example.com", "name": "A", "role": "Not A Slug"}, "role"),
    ],
)
async def test_an_invalid_member_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], body: dict[str, object], field: str
) -> None:
    assert_invalid(await client.post(MEMBERS, json=body, headers=owner_headers), field)
    assert len((await client.get(MEMBERS, headers=owner_headers)).json()["items"]) == 1


async def test_a_member_given_an_unknown_role_is_not_found_naming_the_role(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    body = {"email": "a@example.com", "name": "A", "role": "ghost"}
    assert_unknown(await client.post(MEMBERS, json=body, headers=owner_headers), "role")
    assert_unknown(
        await client.patch(f"{MEMBERS}/owner@example.com", json={"role": "ghost"}, headers=owner_headers), "role"
    )


async def test_a_duplicate_email_is_a_conflict_whatever_its_case(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(MEMBERS, json={"email": "ada@example.com", "name": "Ada"}, headers=owner_headers)
    again = await client.post(MEMBERS, json={"email": "ADA@example.com", "name": "Ada 2"}, headers=owner_headers)
    assert_problem(again, 409, "conflict")
    renamed = await client.patch(
        f"{MEMBERS}/ada@example.com", json={"email": "owner@example.com"}, headers=owner_headers
    )
    assert_problem(renamed, 409, "conflict")


async def test_a_missing_member_is_not_found(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    for response in (
        await client.get(f"{MEMBERS}/ghost@example.com", headers=owner_headers),
        await client.patch(f"{MEMBERS}/ghost@example.com", json={"name": "G"}, headers=owner_headers),
        await client.delete(f"{MEMBERS}/ghost@example.com", headers=owner_headers),
        await client.get(f"{MEMBERS}/ghost@example.com/api-keys", headers=owner_headers),
    ):
        assert_problem(response, 404, "not_found")


async def test_an_edit_with_a_stale_etag_is_refused_and_the_current_one_passes(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await client.post(MEMBERS, json={"email": "ada@example.com", "name": "Ada"}, headers=owner_headers)
    read = await client.get(f"{MEMBERS}/ada@example.com", headers=owner_headers)
    await client.patch(f"{MEMBERS}/ada@example.com", json={"name": "Ada B"}, headers=owner_headers)
    stale = await client.patch(
        f"{MEMBERS}/ada@example.com",
        json={"name": "Ada C"},
        headers={**owner_headers, "If-Match": read.headers["etag"]},
    )
    assert_problem(stale, 412, "version_mismatch")
    fresh = await client.get(f"{MEMBERS}/ada@example.com", headers=owner_headers)
    ok = await client.patch(
        f"{MEMBERS}/ada@example.com",
        json={"name": "Ada C"},
        headers={**owner_headers, "If-Match": fresh.headers["etag"]},
    )
    assert ok.status_code == 200 and ok.json()["name"] == "Ada C"


async def test_members_page_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = [
        (
            await client.post(MEMBERS, json={"email": f"m{i}@example.com", "name": f"M{i}"}, headers=owner_headers)
        ).json()["id"]
        for i in range(7)
    ]
    await assert_pages_cover(client, owner_headers, MEMBERS, created)


async def test_the_last_owner_cannot_be_demoted_disabled_or_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    me = f"{MEMBERS}/owner@example.com"
    assert_problem(await client.patch(me, json={"role": "admin"}, headers=owner_headers), 409, "conflict")
    assert_problem(await client.patch(me, json={"status": "disabled"}, headers=owner_headers), 409, "conflict")
    assert_problem(await client.delete(me, headers=owner_headers), 409, "conflict")
    assert (await client.get(f"{API}/me", headers=owner_headers)).json()["role"]["name"] == "owner"

    await client.post(MEMBERS, json={"email": "two@example.com", "name": "Two", "role": "owner"}, headers=owner_headers)
    demoted = await client.patch(me, json={"role": "admin"}, headers=owner_headers)
    assert demoted.status_code == 200, demoted.text


async def test_a_member_manager_cannot_make_anyone_owner_or_admin(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    manager = await caller_with(store, hasher, operator, "mm@example.com", {Capability.MEMBERS_MANAGE})
    await client.post(MEMBERS, json={"email": "ada@example.com", "name": "Ada"}, headers=manager)
    for target in ("mm@example.com", "ada@example.com"):
        for role in ("owner", "admin"):
            response = await client.patch(f"{MEMBERS}/{target}", json={"role": role}, headers=manager)
            assert_problem(response, 403, "forbidden")
    for role in ("owner", "admin"):
        body = {"email": f"{role}2@example.com", "name": "X", "role": role}
        assert_problem(await client.post(MEMBERS, json=body, headers=manager), 403, "forbidden")
    assert_problem(
        await client.patch(f"{MEMBERS}/owner@example.com", json={"status": "disabled"}, headers=manager),
        403,
        "forbidden",
    )
    assert_problem(await client.delete(f"{MEMBERS}/owner@example.com", headers=manager), 403, "forbidden")

    me = (await client.get(f"{API}/me", headers=manager)).json()
    assert me["role"]["capabilities"] == ["members.manage"]
    ada = (await client.get(f"{MEMBERS}/ada@example.com", headers=owner_headers)).json()
    assert ada["role_id"] == await _role_id(client, owner_headers, "member") and ada["version"] == 1
    assert (await client.get(f"{MEMBERS}/owner@example.com", headers=owner_headers)).json()["status"] == "active"


async def test_an_admin_cannot_promote_themselves_to_owner(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    admin = await member_with_key(store, hasher, operator, "admin@example.com", "admin")
    assert_problem(
        await client.patch(f"{MEMBERS}/admin@example.com", json={"role": "owner"}, headers=admin), 403, "forbidden"
    )
    assert (await client.get(f"{API}/me", headers=admin)).json()["role"]["name"] == "admin"


async def test_a_disabled_member_is_refused_and_re_enabling_restores_them(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ada = await member_with_key(store, hasher, operator, "ada@example.com", "member")
    assert (await client.get(f"{API}/me", headers=ada)).status_code == 200
    await client.patch(f"{MEMBERS}/ada@example.com", json={"status": "disabled"}, headers=owner_headers)
    assert_problem(await client.get(f"{API}/me", headers=ada), 403, "forbidden")
    listed = await client.get(MEMBERS, params={"status": "disabled"}, headers=owner_headers)
    assert [m["email"] for m in listed.json()["items"]] == ["ada@example.com"]
    await client.patch(f"{MEMBERS}/ada@example.com", json={"status": "active"}, headers=owner_headers)
    assert (await client.get(f"{API}/me", headers=ada)).status_code == 200
