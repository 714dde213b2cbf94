"""Connections and access tokens through the REST API, checked against Map 2 (the Resolver) after each action."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import MEMBER_ROLE, Capability
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, IdentityScheme, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, ServerSpec
from bastion.errors import BastionError, Unauthenticated
from bastion.services import gateways, hosts, identities, servers
from bastion.services.apikeys import KeyHasher
from bastion.services.principals import GatewayDisabled, HostDisabled, MemberDisabled, Resolver
from tests.conftest import member_with_key
from tests.web.support import API, assert_invalid, assert_problem, caller_with

pytestmark = pytest.mark.anyio
CONNECTIONS = f"{API}/connections"
TOKENS = f"{API}/tokens"


@pytest.fixture
async def world(store: Store, vault: Any, hasher: KeyHasher, operator: Actor) -> dict[str, Any]:
    """Two servers, a per-user gateway, a shared-scheme gateway with a global identity, two hosts."""
    await servers.create(
        store,
        operator,
        ServerSpec("bq", Transport.STREAMABLE_HTTP, "https://bq.example.com/mcp", auth_kind=AuthKind.BEARER),
    )
    await servers.create(
        store,
        operator,
        ServerSpec("wiki", Transport.STREAMABLE_HTTP, "https://wiki.example/mcp", auth_kind=AuthKind.BEARER),
    )
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    shared = await identities.create(
        store, vault, hasher, operator, server="wiki", shared=True, secret=bearer_secret("workspace-wiki-token")
    )
    await gateways.create(
        store,
        operator,
        GatewaySpec(
            "docs",
            servers=(GatewayServerSpec("wiki", identity_scheme=IdentityScheme.SHARED, shared_identity_id=shared.id),),
        ),
    )
    await hosts.create(store, operator, HostSpec("sales-agent"))
    await hosts.create(store, operator, HostSpec("other-agent"))
    return {"shared_identity": shared.id}


@pytest.fixture
async def ada(store: Store, hasher: KeyHasher, operator: Actor) -> dict[str, str]:
    return await member_with_key(store, hasher, operator, "ada@example.com", MEMBER_ROLE)


@pytest.fixture
async def bob(store: Store, hasher: KeyHasher, operator: Actor) -> dict[str, str]:
    return await member_with_key(store, hasher, operator, "bob@example.com", MEMBER_ROLE)


@pytest.fixture
async def resolver(store: Store, hasher: KeyHasher) -> AsyncIterator[Resolver]:
    r = Resolver(store, hasher)
    try:
        yield r
    finally:
        r.close()


async def _identity(client: httpx2.AsyncClient, headers: dict[str, str], server: str = "bq", **body: Any) -> str:
    response = await client.post(
        f"{API}/identities",
        json={"server": server, "token": f"upstream-{server}-token-1234", **body},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    identity_id: str = response.json()["id"]
    return identity_id


async def _connect(client: httpx2.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post(
        CONNECTIONS, json={"host": "sales-agent", "gateway": "analytics", **body}, headers=headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _refused(resolver: Resolver, secret: str, error: type[BastionError]) -> BastionError:
    with pytest.raises(error) as caught:
        await resolver.resolve(secret)
    return caught.value


async def test_a_member_provisions_their_own_connection_and_the_token_resolves_to_them(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], resolver: Resolver
) -> None:
    identity_id = await _identity(client, ada)
    created = await _connect(client, ada)
    connection, token, secret = created["connection"], created["token"], created["secret"]
    assert connection["identities"] == {"bq": identity_id} and connection["enabled"] is True
    assert secret.startswith("bst_") and token["last4"] == secret[-4:] and token["state"] == "active"
    principal = await resolver.resolve(secret, gateway="analytics", host="sales-agent")
    assert principal.member_email == "ada@example.com"
    assert principal.connection_id == connection["id"] and principal.token_id == token["id"]
    assert principal.identities == {"bq": identity_id}

    for response in (
        await client.get(CONNECTIONS, headers=ada),
        await client.get(f"{CONNECTIONS}/{connection['id']}", headers=ada),
        await client.get(TOKENS, headers=ada),
    ):
        assert response.status_code == 200, response.text
        assert secret not in response.text
    assert [t["id"] for t in (await client.get(TOKENS, headers=ada)).json()["items"]] == [token["id"]]


async def test_provisioning_for_another_member_needs_tokens_manage(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    world: dict[str, Any],
    ada: dict[str, str],
    bob: dict[str, str],
    resolver: Resolver,
) -> None:
    identity_id = await _identity(client, ada)
    body = {"host": "sales-agent", "gateway": "analytics", "member": "ada@example.com"}
    assert_problem(await client.post(CONNECTIONS, json=body, headers=bob), 403, "forbidden")
    manager = await caller_with(store, hasher, operator, "carol@example.com", [Capability.TOKENS_MANAGE])
    created = await client.post(CONNECTIONS, json=body, headers=manager)
    assert created.status_code == 201, created.text
    assert created.json()["connection"]["identities"] == {"bq": identity_id}
    principal = await resolver.resolve(created.json()["secret"])
    assert principal.member_email == "ada@example.com"
    assert [t["id"] for t in (await client.get(TOKENS, headers=ada)).json()["items"]] == [created.json()["token"]["id"]]
    assert (await client.get(TOKENS, headers=manager)).json()["items"] == []


async def test_a_member_without_an_identity_for_a_per_user_server_is_refused_naming_it(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str]
) -> None:
    response = await client.post(CONNECTIONS, json={"host": "sales-agent", "gateway": "analytics"}, headers=ada)
    assert_invalid(response, "identities.bq")
    assert "no identity" in response.json()["detail"]
    assert (await client.get(CONNECTIONS, headers=ada)).json()["items"] == []


async def test_a_member_with_several_identities_must_choose_one(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], resolver: Resolver
) -> None:
    await _identity(client, ada)
    second = await _identity(client, ada, token="another-bq-credential-5678")
    response = await client.post(CONNECTIONS, json={"host": "sales-agent", "gateway": "analytics"}, headers=ada)
    assert_invalid(response, "identities.bq")
    assert "several" in response.json()["detail"]
    chosen = await _connect(client, ada, identities={"bq": second})
    assert chosen["connection"]["identities"] == {"bq": second}
    assert (await resolver.resolve(chosen["secret"])).identities == {"bq": second}


async def test_a_disabled_identity_is_not_auto_picked(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str]
) -> None:
    first = await _identity(client, ada)
    second = await _identity(client, ada, token="another-bq-credential-5678")
    patched = await client.patch(f"{API}/identities/{first}", json={"status": "disabled"}, headers=ada)
    assert patched.status_code == 200
    assert (await _connect(client, ada))["connection"]["identities"] == {"bq": second}
    assert_invalid(
        await client.post(
            CONNECTIONS,
            json={"host": "sales-agent", "gateway": "analytics", "identities": {"bq": first}},
            headers=ada,
        ),
        "identities",
    )


async def test_an_identity_of_someone_else_or_for_another_server_is_refused(
    client: httpx2.AsyncClient,
    world: dict[str, Any],
    ada: dict[str, str],
    bob: dict[str, str],
) -> None:
    await _identity(client, ada)
    bobs = await _identity(client, bob)
    wiki = await _identity(client, ada, server="wiki")
    base = {"host": "sales-agent", "gateway": "analytics"}
    for choice in ({"bq": bobs}, {"bq": wiki}, {"bq": world["shared_identity"]}, {"nope": wiki}):
        response = await client.post(CONNECTIONS, json={**base, "identities": choice}, headers=ada)
        assert_invalid(response, "identities")
    assert (await client.get(CONNECTIONS, headers=ada)).json()["items"] == []


async def test_a_shared_scheme_server_needs_no_identity_of_the_member(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], resolver: Resolver
) -> None:
    created = await _connect(client, ada, gateway="docs")
    assert created["connection"]["identities"] == {}
    assert (await resolver.resolve(created["secret"], gateway="docs")).identities == {}


async def test_unknown_host_gateway_or_member_is_not_found(
    client: httpx2.AsyncClient, world: dict[str, Any], owner_headers: dict[str, str]
) -> None:
    for body in (
        {"host": "ghost", "gateway": "docs"},
        {"host": "sales-agent", "gateway": "ghost"},
        {"host": "sales-agent", "gateway": "docs", "member": "ghost@example.com"},
    ):
        assert_problem(await client.post(CONNECTIONS, json=body, headers=owner_headers), 404, "not_found")


async def test_listing_other_peoples_tokens_needs_tokens_manage(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    world: dict[str, Any],
    ada: dict[str, str],
    bob: dict[str, str],
) -> None:
    adas = (await _connect(client, ada, gateway="docs"))["token"]["id"]
    bobs = (await _connect(client, bob, gateway="docs", host="other-agent"))["token"]["id"]
    assert [t["id"] for t in (await client.get(TOKENS, headers=bob)).json()["items"]] == [bobs]
    for params in ({"host": "sales-agent"}, {"member": "ada@example.com"}, {"every": "true"}):
        assert_problem(await client.get(TOKENS, params=params, headers=bob), 403, "forbidden")
    manager = await caller_with(store, hasher, operator, "carol@example.com", [Capability.TOKENS_MANAGE])

    async def ids(params: dict[str, str]) -> set[str]:
        response = await client.get(TOKENS, params=params, headers=manager)
        assert response.status_code == 200, response.text
        return {t["id"] for t in response.json()["items"]}

    assert await ids({"host": "sales-agent"}) == {adas}
    assert await ids({"host": "other-agent"}) == {bobs}
    assert await ids({"member": "ada@example.com"}) == {adas}
    assert await ids({"every": "true"}) == {adas, bobs}
    assert await ids({}) == set()


async def test_a_member_revokes_their_own_token_but_not_someone_elses(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    world: dict[str, Any],
    ada: dict[str, str],
    bob: dict[str, str],
    resolver: Resolver,
) -> None:
    mine = await _connect(client, ada, gateway="docs")
    theirs = await _connect(client, bob, gateway="docs")
    await resolver.resolve(mine["secret"])
    revoked = await client.post(f"{TOKENS}/{mine['token']['id']}/revoke", headers=ada)
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    with pytest.raises(Unauthenticated, match="revoked"):
        await resolver.resolve(mine["secret"])

    assert_problem(await client.post(f"{TOKENS}/{theirs['token']['id']}/revoke", headers=ada), 403, "forbidden")
    assert (await resolver.resolve(theirs["secret"])).member_email == "bob@example.com"
    manager = await caller_with(store, hasher, operator, "carol@example.com", [Capability.TOKENS_MANAGE])
    by_manager = await client.post(f"{TOKENS}/{theirs['token']['id']}/revoke", headers=manager)
    assert by_manager.status_code == 200 and by_manager.json()["state"] == "revoked"
    with pytest.raises(Unauthenticated, match="revoked"):
        await resolver.resolve(theirs["secret"])
    assert_problem(
        await client.post(f"{TOKENS}/0196f1c2-0000-7000-8000-000000000000/revoke", headers=ada), 404, "not_found"
    )


async def test_disabling_a_connection_needs_the_capability_and_keeps_its_token(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    world: dict[str, Any],
    ada: dict[str, str],
    resolver: Resolver,
) -> None:
    created = await _connect(client, ada, gateway="docs")
    path = f"{CONNECTIONS}/{created['connection']['id']}"
    assert_problem(await client.post(f"{path}/disable", headers=ada), 403, "forbidden")
    admin = await caller_with(store, hasher, operator, "carol@example.com", [Capability.CONNECTIONS_DISABLE_ENABLE])
    await resolver.resolve(created["secret"])

    disabled = await client.post(f"{path}/disable", headers=admin)
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False and disabled.json()["disabled_at"] is not None
    assert (await _refused(resolver, created["secret"], BastionError)).code == "connection_disabled"
    (token,) = (await client.get(TOKENS, headers=ada)).json()["items"]
    assert token["id"] == created["token"]["id"] and token["state"] == "active"

    assert_problem(await client.post(f"{path}/enable", headers=ada), 403, "forbidden")
    enabled = await client.post(f"{path}/enable", headers=admin)
    assert enabled.status_code == 200 and enabled.json()["enabled"] is True
    assert (await resolver.resolve(created["secret"])).token_id == created["token"]["id"]


async def test_an_extra_token_for_a_connection_resolves_to_the_same_connection(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], bob: dict[str, str], resolver: Resolver
) -> None:
    created = await _connect(client, ada, gateway="docs")
    path = f"{CONNECTIONS}/{created['connection']['id']}/tokens"
    assert_problem(await client.post(path, json={}, headers=bob), 403, "forbidden")
    extra = await client.post(path, json={}, headers=ada)
    assert extra.status_code == 201, extra.text
    secret = extra.json()["secret"]
    assert secret.startswith("bst_") and secret != created["secret"]
    principal = await resolver.resolve(secret)
    assert principal.connection_id == created["connection"]["id"] and principal.token_id == extra.json()["token"]["id"]
    listed = await client.get(TOKENS, headers=ada)
    assert {t["id"] for t in listed.json()["items"]} == {created["token"]["id"], extra.json()["token"]["id"]}
    assert secret not in listed.text
    assert_invalid(await client.post(path, json={"expires_at": "2001-01-01T00:00:00Z"}, headers=ada), "expires_at")


async def test_a_connection_can_be_pointed_at_another_of_the_members_identities(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], bob: dict[str, str], resolver: Resolver
) -> None:
    first = await _identity(client, ada)
    created = await _connect(client, ada)
    second = await _identity(client, ada, token="another-bq-credential-5678")
    path = f"{CONNECTIONS}/{created['connection']['id']}/identities/bq"
    bobs = await _identity(client, bob)
    assert_problem(await client.put(path, json={"identity_id": second}, headers=bob), 403, "forbidden")
    assert_invalid(await client.put(path, json={"identity_id": bobs}, headers=ada), "identities")
    assert (await resolver.resolve(created["secret"])).identities == {"bq": first}

    moved = await client.put(path, json={"identity_id": second}, headers=ada)
    assert moved.status_code == 200, moved.text
    assert moved.json()["identities"] == {"bq": second}
    assert moved.json()["version"] > created["connection"]["version"]
    assert (await resolver.resolve(created["secret"])).identities == {"bq": second}
    unknown_alias = f"{CONNECTIONS}/{created['connection']['id']}/identities/nope"
    assert_invalid(await client.put(unknown_alias, json={"identity_id": second}, headers=ada), "identities")


async def test_deleting_a_connection_deletes_its_tokens(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], bob: dict[str, str], resolver: Resolver
) -> None:
    created = await _connect(client, ada, gateway="docs")
    await resolver.resolve(created["secret"])
    path = f"{CONNECTIONS}/{created['connection']['id']}"
    assert_problem(await client.delete(path, headers=bob), 403, "forbidden")
    assert (await client.delete(path, headers=ada)).status_code == 204
    assert_problem(await client.get(path, headers=ada), 404, "not_found")
    assert (await client.get(TOKENS, headers=ada)).json()["items"] == []
    with pytest.raises(Unauthenticated, match="not valid"):
        await resolver.resolve(created["secret"])


async def test_a_disabled_host_refuses_its_tokens_and_enabling_restores_them(
    client: httpx2.AsyncClient,
    world: dict[str, Any],
    ada: dict[str, str],
    owner_headers: dict[str, str],
    resolver: Resolver,
) -> None:
    created = await _connect(client, ada, gateway="docs")
    await resolver.resolve(created["secret"])
    assert (await client.post(f"{API}/hosts/sales-agent/disable", headers=owner_headers)).status_code == 200
    refusal = await _refused(resolver, created["secret"], HostDisabled)
    assert (refusal.status, refusal.code) == (403, "host_disabled")
    assert [t["state"] for t in (await client.get(TOKENS, headers=ada)).json()["items"]] == ["active"]
    assert (await client.post(f"{API}/hosts/sales-agent/enable", headers=owner_headers)).status_code == 200
    assert (await resolver.resolve(created["secret"])).host_name == "sales-agent"


async def test_a_disabled_member_or_gateway_refuses_the_token(
    client: httpx2.AsyncClient,
    world: dict[str, Any],
    ada: dict[str, str],
    owner_headers: dict[str, str],
    resolver: Resolver,
) -> None:
    created = await _connect(client, ada, gateway="docs")
    await resolver.resolve(created["secret"])
    member = await client.patch(f"{API}/members/ada@example.com", json={"status": "disabled"}, headers=owner_headers)
    assert member.status_code == 200, member.text
    assert (await _refused(resolver, created["secret"], MemberDisabled)).code == "member_disabled"
    await client.patch(f"{API}/members/ada@example.com", json={"status": "active"}, headers=owner_headers)
    assert (await resolver.resolve(created["secret"])).member_email == "ada@example.com"

    gateway = await client.patch(f"{API}/gateways/docs", json={"enabled": False}, headers=owner_headers)
    assert gateway.status_code == 200, gateway.text
    assert (await _refused(resolver, created["secret"], GatewayDisabled)).code == "gateway_disabled"
    await client.patch(f"{API}/gateways/docs", json={"enabled": True}, headers=owner_headers)
    assert (await resolver.resolve(created["secret"])).gateway_slug == "docs"


async def test_a_token_is_refused_at_another_gateway_or_host(
    client: httpx2.AsyncClient, world: dict[str, Any], ada: dict[str, str], resolver: Resolver
) -> None:
    created = await _connect(client, ada, gateway="docs")
    with pytest.raises(Unauthenticated):
        await resolver.resolve(created["secret"], gateway="analytics")
    with pytest.raises(Unauthenticated):
        await resolver.resolve(created["secret"], host="other-agent")
    assert (await resolver.resolve(created["secret"], gateway="docs", host="sales-agent")).gateway_slug == "docs"


async def test_other_members_cannot_read_or_list_a_connection_without_a_capability(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    world: dict[str, Any],
    ada: dict[str, str],
    bob: dict[str, str],
) -> None:
    created = await _connect(client, ada, gateway="docs")
    path = f"{CONNECTIONS}/{created['connection']['id']}"
    assert_problem(await client.get(path, headers=bob), 403, "forbidden")
    assert (await client.get(CONNECTIONS, headers=bob)).json()["items"] == []
    assert_problem(await client.get(CONNECTIONS, params={"every": "true"}, headers=bob), 403, "forbidden")
    admin = await caller_with(store, hasher, operator, "carol@example.com", [Capability.CONNECTIONS_DISABLE_ENABLE])
    assert (await client.get(path, headers=admin)).status_code == 200
    listed = await client.get(CONNECTIONS, params={"member": "ada@example.com"}, headers=admin)
    assert [c["id"] for c in listed.json()["items"]] == [created["connection"]["id"]]
