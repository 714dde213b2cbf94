"""Connection links: the URL is shown once, the list shows uses and state, and a use is counted atomically."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx2
import pytest
import time_machine

from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import MEMBER_ROLE
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, ServerSpec
from bastion.errors import Conflict, NotFound
from bastion.services import gateways, hosts, links, servers, workspace
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key
from tests.web.support import API, assert_invalid, assert_problem

pytestmark = pytest.mark.anyio
LINKS = f"{API}/links"


async def _make_targets(store: Store, operator: Actor) -> None:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, "https://bq.example.com/mcp"))
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("sales-agent"))


@pytest.fixture
async def targets(store: Store, operator: Actor) -> None:
    await _make_targets(store, operator)


async def _create(client: httpx2.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post(LINKS, json={"host": "sales-agent", "gateway": "analytics", **body}, headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _secret_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def _listed(client: httpx2.AsyncClient, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    response = await client.get(LINKS, headers=headers)
    assert response.status_code == 200, response.text
    return {link["id"]: link for link in response.json()["items"]}


async def _consume(store: Store, hasher: KeyHasher, secret: str, email: str) -> None:
    async with store.transaction() as conn:
        link = await links.find_by_secret(conn, hasher, secret)
        await links.consume(conn, link, email)


async def test_a_link_url_is_returned_once_and_the_list_shows_it_without_the_secret(
    client: httpx2.AsyncClient, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(
        client, owner_headers, max_uses=3, note="for the sales team", allowed_emails=["Ada@Example.com"]
    )
    url = created["url"]
    assert "/enroll/bsl_" in url
    secret = _secret_of(url)
    assert tokens.well_formed(secret, tokens.LINK_PREFIX)
    link = created["link"]
    assert link["state"] == "active" and link["uses"] == 0 and link["max_uses"] == 3
    assert link["allowed_emails"] == ["ada@example.com"] and link["note"] == "for the sales team"
    listing = await client.get(LINKS, headers=owner_headers)
    assert [item["id"] for item in listing.json()["items"]] == [link["id"]]
    assert secret not in listing.text and secret[4:] not in listing.text
    assert (await client.get(LINKS, params={"host": "sales-agent"}, headers=owner_headers)).json()["items"]
    assert_problem(await client.get(LINKS, params={"gateway": "ghost"}, headers=owner_headers), 404, "not_found")


async def test_a_revoked_link_shows_revoked_and_cannot_be_used(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(client, owner_headers)
    revoked = await client.post(f"{LINKS}/{created['link']['id']}/revoke", headers=owner_headers)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "revoked" and revoked.json()["revoked_at"] is not None
    again = await client.post(f"{LINKS}/{created['link']['id']}/revoke", headers=owner_headers)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert (await _listed(client, owner_headers))[created["link"]["id"]]["state"] == "revoked"
    with pytest.raises(Conflict, match="revoked"):
        await _consume(store, hasher, _secret_of(created["url"]), "ada@example.com")
    assert (await _listed(client, owner_headers))[created["link"]["id"]]["uses"] == 0
    assert_problem(
        await client.post(f"{LINKS}/0196f1c2-0000-7000-8000-000000000000/revoke", headers=owner_headers),
        404,
        "not_found",
    )


async def test_a_link_past_its_expiry_shows_expired_and_cannot_be_used(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(client, owner_headers, expires_in_hours=1)
    secret = _secret_of(created["url"])
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=59), tick=False):
        assert (await _listed(client, owner_headers))[created["link"]["id"]]["state"] == "active"
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=1, seconds=1), tick=False):
        assert (await _listed(client, owner_headers))[created["link"]["id"]]["state"] == "expired"
        with pytest.raises(Conflict, match="expired"):
            await _consume(store, hasher, secret, "ada@example.com")
    assert (await _listed(client, owner_headers))[created["link"]["id"]]["uses"] == 0


async def test_uses_are_counted_and_a_used_up_link_refuses_the_next_one(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(client, owner_headers, max_uses=2)
    secret = _secret_of(created["url"])
    await _consume(store, hasher, secret, "ada@example.com")
    listed = (await _listed(client, owner_headers))[created["link"]["id"]]
    assert (listed["uses"], listed["state"]) == (1, "active")
    await _consume(store, hasher, secret, "bob@example.com")
    listed = (await _listed(client, owner_headers))[created["link"]["id"]]
    assert (listed["uses"], listed["state"]) == (2, "used_up")
    with pytest.raises(Conflict, match="used up"):
        await _consume(store, hasher, secret, "carol@example.com")
    assert (await _listed(client, owner_headers))[created["link"]["id"]]["uses"] == 2


async def test_a_link_is_shared_for_72_hours_each_person_enrolling_as_themselves_unless_a_limit_is_asked_for(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, targets: None, owner_headers: dict[str, str]
) -> None:
    default = await _create(client, owner_headers)
    lifetime = datetime.fromisoformat(default["link"]["expires_at"]) - datetime.fromisoformat(
        default["link"]["created_at"]
    )
    assert (default["link"]["max_uses"], lifetime) == (None, timedelta(hours=72))
    for email in ("ada@example.com", "bob@example.com", "carol@example.com"):
        await _consume(store, hasher, _secret_of(default["url"]), email)
    listed = (await _listed(client, owner_headers))[default["link"]["id"]]
    assert (listed["uses"], listed["state"]) == (3, "active")

    single = await _create(client, owner_headers, max_uses=1, expires_in_hours=24 * 30)
    assert single["link"]["max_uses"] == 1
    await _consume(store, hasher, _secret_of(single["url"]), "ada@example.com")
    with pytest.raises(Conflict, match="used up"):
        await _consume(store, hasher, _secret_of(single["url"]), "bob@example.com")
    assert (await _listed(client, owner_headers))[single["link"]["id"]]["state"] == "used_up"


async def test_a_link_for_invited_people_refuses_anyone_else(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(client, owner_headers, allowed_emails=["ada@example.com"])
    secret = _secret_of(created["url"])
    with pytest.raises(Conflict, match="invited people only"):
        await _consume(store, hasher, secret, "mallory@example.com")
    await _consume(store, hasher, secret, "ADA@example.com")
    assert (await _listed(client, owner_headers))[created["link"]["id"]]["uses"] == 1


async def test_a_malformed_or_unknown_link_secret_is_not_found(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(client, owner_headers)
    secret = _secret_of(created["url"])
    for wrong in (secret[:-1], secret[:-1] + ("A" if secret[-1] != "A" else "B"), tokens.mint(tokens.LINK_PREFIX)):
        with pytest.raises(NotFound):
            await _consume(store, hasher, wrong, "ada@example.com")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expires_in_hours": 0}, "expires_in_hours"),
        ({"expires_in_hours": -1}, "expires_in_hours"),
        ({"expires_in_hours": 0.05}, "expires_in_hours"),
        ({"expires_in_hours": 2160.5}, "expires_in_hours"),
        ({"max_uses": 0}, "max_uses"),
        ({"allowed_emails": ["not-an-email"]}, "allowed_emails"),
        ({"allowed_emails": ["ada@example.com", "bob at example.com"]}, "allowed_emails"),
        ({"note": "n" * 201}, "note"),
        ({"extra": True}, "extra"),
    ],
)
async def test_bad_link_input_is_refused_naming_the_field(
    client: httpx2.AsyncClient, targets: None, owner_headers: dict[str, str], body: dict[str, Any], field: str
) -> None:
    response = await client.post(
        LINKS, json={"host": "sales-agent", "gateway": "analytics", **body}, headers=owner_headers
    )
    assert_invalid(response, field)
    assert await _listed(client, owner_headers) == {}


async def test_the_longest_allowed_lifetime_is_ninety_days(
    client: httpx2.AsyncClient, targets: None, owner_headers: dict[str, str]
) -> None:
    created = await _create(client, owner_headers, expires_in_hours=2160)
    lifetime = datetime.fromisoformat(created["link"]["expires_at"]) - datetime.fromisoformat(
        created["link"]["created_at"]
    )
    assert lifetime == timedelta(days=90)


async def test_a_link_for_an_unknown_host_or_gateway_is_not_found(
    client: httpx2.AsyncClient, targets: None, owner_headers: dict[str, str]
) -> None:
    for body in ({"host": "ghost", "gateway": "analytics"}, {"host": "sales-agent", "gateway": "ghost"}):
        assert_problem(await client.post(LINKS, json=body, headers=owner_headers), 404, "not_found")


async def test_a_member_without_tokens_manage_cannot_create_list_or_revoke_links(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    targets: None,
    owner_headers: dict[str, str],
) -> None:
    ada = await member_with_key(store, hasher, operator, "ada@example.com", MEMBER_ROLE)
    created = await _create(client, owner_headers)
    body = {"host": "sales-agent", "gateway": "analytics"}
    assert_problem(await client.post(LINKS, json=body, headers=ada), 403, "forbidden")
    assert_problem(await client.get(LINKS, headers=ada), 403, "forbidden")
    assert_problem(await client.post(f"{LINKS}/{created['link']['id']}/revoke", headers=ada), 403, "forbidden")
    assert (await _listed(client, owner_headers))[created["link"]["id"]]["state"] == "active"


async def test_two_concurrent_uses_of_a_single_use_link_let_exactly_one_through(pg_store: Store) -> None:
    store = pg_store
    operator = Actor.local_operator((await workspace.default_workspace(store)).id)
    hasher = KeyHasher(secrets.token_bytes(32))
    await _make_targets(store, operator)
    _link, secret = await links.create(store, hasher, operator, host="sales-agent", gateway="analytics", max_uses=1)
    outcomes: list[str] = []

    async def use(email: str, ready: anyio.Event, go: anyio.Event) -> None:
        try:
            async with store.transaction() as conn:
                # Both read the link while it is still active; only the guarded update may decide.
                link = await links.find_by_secret(conn, hasher, secret)
                ready.set()
                await go.wait()
                await links.consume(conn, link, email)
        except Conflict as exc:
            outcomes.append(f"refused: {exc.detail}")
        else:
            outcomes.append("used")

    with anyio.fail_after(10):
        go = anyio.Event()
        async with anyio.create_task_group() as tg:
            readies = [anyio.Event(), anyio.Event()]
            for email, ready in zip(("ada@example.com", "bob@example.com"), readies, strict=True):
                tg.start_soon(use, email, ready, go)
            for ready in readies:
                await ready.wait()
            go.set()
    assert sorted(outcomes) == ["refused: this connection link was used up or revoked a moment ago", "used"]
    async with store.transaction() as conn:
        assert (await links.find_by_secret(conn, hasher, secret)).uses == 1
