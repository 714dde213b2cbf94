from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx2
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key
from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem, caller_with

pytestmark = pytest.mark.anyio
MINE = f"{API}/me/api-keys"


def _secret(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def test_a_new_key_is_shown_once_and_then_works(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(MINE, json={"name": "laptop"}, headers=owner_headers)
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert tokens.well_formed(secret, tokens.API_KEY_PREFIX)
    assert created.json()["key"]["last4"] == secret[-4:]
    me = await client.get(f"{API}/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200 and me.json()["member"]["email"] == "owner@example.com"
    listed = await client.get(MINE, headers=owner_headers)
    assert secret not in listed.text and _secret(owner_headers) not in listed.text
    assert {k["name"] for k in listed.json()["items"]} == {"test", "laptop"}
    used = [k for k in listed.json()["items"] if k["name"] == "laptop"]
    assert used[0]["last_used_at"] is not None


async def test_keys_are_stored_only_as_digests(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher
) -> None:
    secrets = [_secret(owner_headers)]
    for i in range(3):
        created = await client.post(MINE, json={"name": f"k{i}"}, headers=owner_headers)
        secrets.append(created.json()["secret"])
    async with store.transaction() as conn:
        rows = (await conn.execute(sa.select(schema.api_keys))).all()
    assert len(rows) == len(secrets)
    dumped = repr([tuple(r) for r in rows])
    for secret in secrets:
        body = secret.removeprefix(tokens.API_KEY_PREFIX)
        assert body[:16] not in dumped and body[-16:] not in dumped
        assert secret.encode("ascii") not in b"".join(r.digest for r in rows)
    assert {r.digest for r in rows} == {hasher.digest(s) for s in secrets}


async def test_a_revoked_key_stops_working_and_revoking_again_is_harmless(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = (await client.post(MINE, json={"name": "ci"}, headers=owner_headers)).json()
    ci = {"Authorization": f"Bearer {created['secret']}"}
    assert (await client.delete(f"{MINE}/{created['key']['id']}", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{API}/me", headers=ci), 401, "unauthenticated")
    assert (await client.delete(f"{MINE}/{created['key']['id']}", headers=owner_headers)).status_code == 204
    assert_problem(await client.delete(f"{MINE}/no-such-key", headers=owner_headers), 404, "not_found")


async def test_another_members_key_is_out_of_reach_of_the_me_routes(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ada = await member_with_key(store, hasher, operator, "ada@example.com", "member")
    ada_key = (await client.get(MINE, headers=ada)).json()["items"][0]["id"]
    assert_problem(await client.delete(f"{MINE}/{ada_key}", headers=owner_headers), 404, "not_found")
    assert (await client.get(f"{API}/me", headers=ada)).status_code == 200


async def test_a_member_key_is_revoked_only_through_its_own_member(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ada = await member_with_key(store, hasher, operator, "ada@example.com", "member")
    await member_with_key(store, hasher, operator, "bob@example.com", "member")
    ada_keys = await client.get(f"{API}/members/ada@example.com/api-keys", headers=owner_headers)
    assert _secret(ada) not in ada_keys.text
    ada_key = ada_keys.json()["items"][0]["id"]
    wrong = await client.delete(f"{API}/members/bob@example.com/api-keys/{ada_key}", headers=owner_headers)
    assert_problem(wrong, 404, "not_found")
    assert (await client.get(f"{API}/me", headers=ada)).status_code == 200
    right = await client.delete(f"{API}/members/ada@example.com/api-keys/{ada_key}", headers=owner_headers)
    assert right.status_code == 204
    assert_problem(await client.get(f"{API}/me", headers=ada), 401, "unauthenticated")


async def test_a_member_manager_cannot_revoke_the_keys_of_someone_more_powerful(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    manager = await caller_with(store, hasher, operator, "mm@example.com", {Capability.MEMBERS_MANAGE})
    owner_key = (await client.get(MINE, headers=owner_headers)).json()["items"][0]["id"]
    revoke = await client.delete(f"{API}/members/owner@example.com/api-keys/{owner_key}", headers=manager)
    assert_problem(revoke, 403, "forbidden")
    assert (await client.get(f"{API}/me", headers=owner_headers)).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "k", "scope": "all"}, "scope"),
        ({"name": ""}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "k", "expires_at": "not a date"}, "expires_at"),
    ],
)
async def test_an_invalid_key_request_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], body: dict[str, object], field: str
) -> None:
    assert_invalid(await client.post(MINE, json=body, headers=owner_headers), field)
    assert len((await client.get(MINE, headers=owner_headers)).json()["items"]) == 1


async def test_an_expired_key_is_refused(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store
) -> None:
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    created = (await client.post(MINE, json={"name": "short", "expires_at": soon}, headers=owner_headers)).json()
    short = {"Authorization": f"Bearer {created['secret']}"}
    assert (await client.get(f"{API}/me", headers=short)).status_code == 200
    async with store.transaction() as conn:
        await conn.execute(
            schema.api_keys.update()
            .where(schema.api_keys.c.id == created["key"]["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert_problem(await client.get(f"{API}/me", headers=short), 401, "unauthenticated")


async def test_keys_page_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = [
        (await client.post(MINE, json={"name": f"k{i}"}, headers=owner_headers)).json()["key"]["id"] for i in range(7)
    ]
    await assert_pages_cover(client, owner_headers, MINE, created)
