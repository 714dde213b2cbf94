"""Identities through the REST API: private ones are self-service, others' and global ones need identities.manage."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import MEMBER_ROLE, Capability
from bastion.domain.models import Transport
from bastion.domain.specs import ServerSpec
from bastion.services import identities, servers
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key
from tests.web.support import API, assert_invalid, assert_problem, caller_with

pytestmark = pytest.mark.anyio
IDENTITIES = f"{API}/identities"
UPSTREAM_SECRET = "ada-upstream-credential-0123456789"


@pytest.fixture
async def server(store: Store, operator: Actor) -> str:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, "https://bq.example.com/mcp"))
    return "bq"


@pytest.fixture
async def ada(store: Store, hasher: KeyHasher, operator: Actor) -> dict[str, str]:
    return await member_with_key(store, hasher, operator, "ada@example.com", MEMBER_ROLE)


@pytest.fixture
async def bob(store: Store, hasher: KeyHasher, operator: Actor) -> dict[str, str]:
    return await member_with_key(store, hasher, operator, "bob@example.com", MEMBER_ROLE)


async def _create(client: httpx2.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post(IDENTITIES, json={"server": "bq", "token": UPSTREAM_SECRET, **body}, headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _assert_no_secret(response: httpx2.Response, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in response.text


async def test_a_member_creates_lists_reads_edits_and_deletes_their_own_identity_without_a_capability(
    client: httpx2.AsyncClient, store: Store, vault: Any, operator: Actor, server: str, ada: dict[str, str]
) -> None:
    created = await client.post(
        IDENTITIES, json={"server": server, "token": UPSTREAM_SECRET, "label": "my bq"}, headers=ada
    )
    assert created.status_code == 201, created.text
    identity = created.json()
    assert identity["scope"] == "private" and identity["status"] == "active" and identity["label"] == "my bq"
    assert identity["last4"] == UPSTREAM_SECRET[-4:] and len(identity["fingerprint"]) == 16
    assert created.headers["etag"] == '"1"'
    _assert_no_secret(created, UPSTREAM_SECRET)

    listed = await client.get(IDENTITIES, headers=ada)
    assert [i["id"] for i in listed.json()["items"]] == [identity["id"]]
    _assert_no_secret(listed, UPSTREAM_SECRET)
    read = await client.get(f"{IDENTITIES}/{identity['id']}", headers=ada)
    assert read.status_code == 200 and read.json()["fingerprint"] == identity["fingerprint"]
    _assert_no_secret(read, UPSTREAM_SECRET)

    relabelled = await client.patch(
        f"{IDENTITIES}/{identity['id']}", json={"label": "renamed", "status": "disabled"}, headers=ada
    )
    assert relabelled.status_code == 200, relabelled.text
    assert relabelled.json()["label"] == "renamed" and relabelled.json()["status"] == "disabled"
    assert relabelled.json()["fingerprint"] == identity["fingerprint"]

    replacement = "a-brand-new-upstream-token-9876"
    replaced = await client.patch(f"{IDENTITIES}/{identity['id']}", json={"token": replacement}, headers=ada)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["fingerprint"] != identity["fingerprint"]
    assert replaced.json()["last4"] == replacement[-4:]
    assert replaced.json()["version"] > relabelled.json()["version"]
    _assert_no_secret(replaced, replacement, UPSTREAM_SECRET)
    opened = await identities.open_secret(store, vault, operator.workspace_id, identity["id"])
    assert opened.token == replacement

    assert (await client.delete(f"{IDENTITIES}/{identity['id']}", headers=ada)).status_code == 204
    assert_problem(await client.get(f"{IDENTITIES}/{identity['id']}", headers=ada), 404, "not_found")
    assert (await client.get(IDENTITIES, headers=ada)).json()["items"] == []


async def test_the_same_secret_gives_the_same_fingerprint_and_another_secret_another(
    client: httpx2.AsyncClient, server: str, ada: dict[str, str], bob: dict[str, str]
) -> None:
    first = await _create(client, ada)
    same = await _create(client, bob)
    other = await _create(client, ada, token="something-else-entirely-42")
    assert first["fingerprint"] == same["fingerprint"]
    assert other["fingerprint"] != first["fingerprint"]


async def test_another_member_can_neither_see_nor_change_a_private_identity(
    client: httpx2.AsyncClient, server: str, ada: dict[str, str], bob: dict[str, str]
) -> None:
    identity = await _create(client, ada)
    path = f"{IDENTITIES}/{identity['id']}"
    assert_problem(await client.get(path, headers=bob), 403, "forbidden")
    assert_problem(await client.patch(path, json={"label": "mine now"}, headers=bob), 403, "forbidden")
    assert_problem(await client.patch(path, json={"token": "stolen-token-12345"}, headers=bob), 403, "forbidden")
    assert_problem(await client.delete(path, headers=bob), 403, "forbidden")
    assert_problem(await client.get(IDENTITIES, params={"member": "ada@example.com"}, headers=bob), 403, "forbidden")
    assert_problem(await client.get(IDENTITIES, params={"every": "true"}, headers=bob), 403, "forbidden")
    assert (await client.get(IDENTITIES, headers=bob)).json()["items"] == []
    unchanged = (await client.get(path, headers=ada)).json()
    assert unchanged["label"] == identity["label"] and unchanged["fingerprint"] == identity["fingerprint"]


async def test_identities_manage_reaches_other_members_identities(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor, server: str, ada: dict[str, str]
) -> None:
    manager = await caller_with(store, hasher, operator, "carol@example.com", [Capability.IDENTITIES_MANAGE])
    identity = await _create(client, ada)
    path = f"{IDENTITIES}/{identity['id']}"
    assert (await client.get(path, headers=manager)).status_code == 200
    listed = await client.get(IDENTITIES, params={"member": "ada@example.com"}, headers=manager)
    assert [i["id"] for i in listed.json()["items"]] == [identity["id"]]
    assert (await client.patch(path, json={"status": "disabled"}, headers=manager)).json()["status"] == "disabled"
    for_ada = await client.post(
        IDENTITIES,
        json={"server": server, "token": "made-for-ada-by-carol", "member": "ada@example.com"},
        headers=manager,
    )
    assert for_ada.status_code == 201 and for_ada.json()["owner_id"] == identity["owner_id"]
    assert (await client.delete(path, headers=manager)).status_code == 204


async def test_a_member_cannot_create_an_identity_for_someone_else_without_identities_manage(
    client: httpx2.AsyncClient, server: str, ada: dict[str, str], bob: dict[str, str]
) -> None:
    body = {"server": server, "token": UPSTREAM_SECRET, "member": "ada@example.com"}
    assert_problem(await client.post(IDENTITIES, json=body, headers=bob), 403, "forbidden")
    assert (await client.get(IDENTITIES, headers=ada)).json()["items"] == []


async def test_global_identities_need_identities_manage(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor, server: str, ada: dict[str, str]
) -> None:
    manager = await caller_with(store, hasher, operator, "carol@example.com", [Capability.IDENTITIES_MANAGE])
    body = {"server": server, "token": UPSTREAM_SECRET, "shared": True}
    assert_problem(await client.post(IDENTITIES, json=body, headers=ada), 403, "forbidden")
    created = await client.post(IDENTITIES, json=body, headers=manager)
    assert created.status_code == 201, created.text
    shared = created.json()
    assert shared["scope"] == "global" and shared["owner_id"] is None
    assert_problem(await client.get(IDENTITIES, params={"shared": "true"}, headers=ada), 403, "forbidden")
    assert_problem(await client.get(f"{IDENTITIES}/{shared['id']}", headers=ada), 403, "forbidden")
    assert_problem(
        await client.patch(f"{IDENTITIES}/{shared['id']}", json={"label": "x"}, headers=ada), 403, "forbidden"
    )
    assert_problem(await client.delete(f"{IDENTITIES}/{shared['id']}", headers=ada), 403, "forbidden")
    listed = await client.get(IDENTITIES, params={"shared": "true"}, headers=manager)
    assert [i["id"] for i in listed.json()["items"]] == [shared["id"]]
    assert_invalid(await client.post(IDENTITIES, json={**body, "member": "ada@example.com"}, headers=manager), "owner")


async def test_a_header_identity_keeps_its_header_names_but_not_its_values(
    client: httpx2.AsyncClient, server: str, ada: dict[str, str]
) -> None:
    response = await client.post(
        IDENTITIES, json={"server": server, "headers": {"X-Api-Key": "header-secret-value-1234"}}, headers=ada
    )
    assert response.status_code == 201, response.text
    assert response.json()["details"]["header_names"] == ["X-Api-Key"]
    _assert_no_secret(response, "header-secret-value-1234")


@pytest.mark.parametrize(
    "header", ["Host", "Content-Length", "Mcp-Session-Id", "mcp-protocol-version", "Transfer-Encoding", "Cookie2"]
)
async def test_a_header_identity_may_not_set_transport_headers(
    client: httpx2.AsyncClient, server: str, ada: dict[str, str], header: str
) -> None:
    body = {"server": server, "headers": {"X-Api-Key": "fine-value", header: "evil"}}
    assert_invalid(await client.post(IDENTITIES, json=body, headers=ada), "headers")
    identity = await _create(client, ada)
    patched = await client.patch(f"{IDENTITIES}/{identity['id']}", json={"headers": {header: "evil"}}, headers=ada)
    assert_invalid(patched, "headers")
    assert (await client.get(IDENTITIES, headers=ada)).json()["items"] == [
        (await client.get(f"{IDENTITIES}/{identity['id']}", headers=ada)).json()
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"token": ""}, "token"),
        ({"token": "   "}, "token"),
        ({"token": "has a space"}, "token"),
        ({"token": "tab\tinside"}, "token"),
        ({"token": "x" * (16 * 1024 + 1)}, "token"),
        ({}, "token"),
        ({"token": "a-fine-token-123", "headers": {"X-Api-Key": "v"}}, "token"),
        ({"headers": {"Bad Name": "v"}}, "headers"),
        ({"headers": {"X-Api-Key": ""}}, "headers"),
        ({"headers": {f"X-H{i}": "v" for i in range(17)}}, "headers"),
        ({"token": "a-fine-token-123", "label": ""}, "label"),
        ({"token": "a-fine-token-123", "surprise": 1}, "surprise"),
    ],
)
async def test_bad_identity_input_is_refused_naming_the_field(
    client: httpx2.AsyncClient, server: str, ada: dict[str, str], body: dict[str, Any], field: str
) -> None:
    assert_invalid(await client.post(IDENTITIES, json={"server": server, **body}, headers=ada), field)
    assert (await client.get(IDENTITIES, headers=ada)).json()["items"] == []


async def test_a_bearer_prefix_on_a_pasted_token_is_dropped(
    client: httpx2.AsyncClient, store: Store, vault: Any, operator: Actor, server: str, ada: dict[str, str]
) -> None:
    created = await _create(client, ada, token=f"Bearer {UPSTREAM_SECRET}")
    opened = await identities.open_secret(store, vault, operator.workspace_id, created["id"])
    assert opened.outbound_headers() == {"Authorization": f"Bearer {UPSTREAM_SECRET}"}


async def test_an_identity_for_an_unknown_server_is_not_found(client: httpx2.AsyncClient, ada: dict[str, str]) -> None:
    response = await client.post(IDENTITIES, json={"server": "ghost", "token": UPSTREAM_SECRET}, headers=ada)
    assert_problem(response, 404, "not_found")
    assert_problem(await client.get(IDENTITIES, params={"server": "ghost"}, headers=ada), 404, "not_found")


async def test_a_missing_identity_is_not_found(client: httpx2.AsyncClient, ada: dict[str, str]) -> None:
    path = f"{IDENTITIES}/0196f1c2-0000-7000-8000-000000000000"
    assert_problem(await client.get(path, headers=ada), 404, "not_found")
    assert_problem(await client.patch(path, json={"label": "x"}, headers=ada), 404, "not_found")
    assert_problem(await client.delete(path, headers=ada), 404, "not_found")


async def test_a_stale_etag_refuses_the_edit(client: httpx2.AsyncClient, server: str, ada: dict[str, str]) -> None:
    identity = await _create(client, ada)
    path = f"{IDENTITIES}/{identity['id']}"
    assert (await client.patch(path, json={"label": "one"}, headers=ada)).status_code == 200
    stale = {**ada, "If-Match": '"1"'}
    assert_problem(await client.patch(path, json={"label": "two"}, headers=stale), 412, "version_mismatch")
    assert (await client.get(path, headers=ada)).json()["label"] == "one"
