"""Claim codes and host keys through the API: a code is redeemed once, by the host it was sent to, and only while it
is live; every redemption is audited; host keys are managed like API keys."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx2
import pytest
import sqlalchemy as sa
import time_machine

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens as token_format
from bastion.domain.actor import Actor
from bastion.domain.specs import HostSpec
from bastion.services import host_keys, hosts, tokens
from bastion.services.apikeys import KeyHasher
from tests.conftest import problem_of
from tests.mcp_support import serving
from tests.webhooks.receiver import Receiver
from tests.webhooks.support import ADA, GATEWAY, World, build_world, drain, worker

pytestmark = pytest.mark.anyio
API = "/api/v1"
REDEEM = f"{API}/claims/redeem"


@pytest.fixture
async def world(store: Store, hasher: KeyHasher, operator: Actor) -> World:
    return await build_world(store, hasher, operator)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def _key(world: World, host: str) -> str:
    _key, secret = await host_keys.create(world.store, world.hasher, world.operator, host, name="agent")
    return secret


async def _delivered_code(world: World) -> tuple[str, str, str]:
    """Ada connects; the event reaches a real receiver: (claim code, token, token id)."""
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        await world.endpoint(base)
        _connection, token, secret = await world.connect()
        await drain(found, post)
    (got,) = receiver.received
    return got.data["claim_code"], secret, token.id


async def _audit(world: World) -> list[tuple[str, str | None, str | None]]:
    e = schema.audit_events
    async with world.store.transaction() as conn:
        rows = (await conn.execute(sa.select(e).where(e.c.method == "claim.redeemed").order_by(e.c.occurred_at))).all()
    return [(r.outcome, r.actor, r.target) for r in rows]


async def test_a_claim_code_is_redeemed_once_by_its_own_host_only(
    world: World, client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    code, secret, token_id = await _delivered_code(world)
    other = await hosts.create(world.store, world.operator, HostSpec("other-agent"))
    mine, theirs = await _key(world, world.host.name), await _key(world, other.name)

    for headers, status in (
        ({}, 401),
        (owner_headers, 401),  # a member's API key is not a host key, whatever the member may do
        (bearer(token_format.mint(token_format.HOST_KEY_PREFIX)), 401),
        (bearer(theirs), 404),  # another host's: not found, exactly like an unknown code
    ):
        refused = await client.post(REDEEM, json={"claim_code": code}, headers=headers)
        assert refused.status_code == status, refused.text
        assert secret not in refused.text
    unknown = await client.post(REDEEM, json={"claim_code": token_format.mint("bsc_")}, headers=bearer(mine))
    malformed = await client.post(REDEEM, json={"claim_code": "bsc_nope"}, headers=bearer(mine))
    assert unknown.status_code == malformed.status_code == 404
    assert problem_of(unknown)["detail"] == problem_of(malformed)["detail"]

    redeemed = await client.post(REDEEM, json={"claim_code": code}, headers=bearer(mine))
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.headers["cache-control"] == "no-store"
    body = redeemed.json()
    assert (body["token"], body["token_id"], body["gateway"]) == (secret, token_id, GATEWAY)
    assert body["member"]["email"] == ADA

    again = await client.post(REDEEM, json={"claim_code": code}, headers=bearer(mine))
    assert again.status_code == 404
    (claim,) = await world.rows(schema.claim_codes)
    assert claim.redeemed_at is not None and claim.secret_sealed is None and claim.kek_id is None
    audit = await _audit(world)
    assert [a[0] for a in audit].count("ok") == 1 and audit.count(("ok", "host:agent", f"token:{token_id}")) == 1
    assert [a[0] for a in audit].count("denied") == 4  # another host's, unknown, malformed, used


async def test_a_claim_code_expires_ten_minutes_after_the_attempt_that_carried_it(
    world: World, client: httpx2.AsyncClient
) -> None:
    code, _secret, _token_id = await _delivered_code(world)
    mine = await _key(world, world.host.name)
    (claim,) = await world.rows(schema.claim_codes)
    with time_machine.travel(claim.expires_at + timedelta(seconds=1), tick=False):
        expired = await client.post(REDEEM, json={"claim_code": code}, headers=bearer(mine))
    assert expired.status_code == 404
    with time_machine.travel(claim.expires_at - timedelta(seconds=5), tick=False):
        live = await client.post(REDEEM, json={"claim_code": code}, headers=bearer(mine))
    assert live.status_code == 200


async def test_a_revoked_token_cannot_be_claimed(world: World, client: httpx2.AsyncClient) -> None:
    code, _secret, token_id = await _delivered_code(world)
    mine = await _key(world, world.host.name)
    await tokens.revoke(world.store, world.operator, token_id)
    assert (await client.post(REDEEM, json={"claim_code": code}, headers=bearer(mine))).status_code == 404
    assert await world.rows(schema.claim_codes) == []


async def test_a_disabled_host_or_a_revoked_key_cannot_claim(world: World, client: httpx2.AsyncClient) -> None:
    code, _secret, _token_id = await _delivered_code(world)
    key, secret = await host_keys.create(world.store, world.hasher, world.operator, world.host.id, name="agent")
    await hosts.set_enabled(world.store, world.operator, world.host.id, False)
    disabled = await client.post(REDEEM, json={"claim_code": code}, headers=bearer(secret))
    assert disabled.status_code == 403 and problem_of(disabled)["code"] == "forbidden"
    await hosts.set_enabled(world.store, world.operator, world.host.id, True)
    await host_keys.revoke(world.store, world.operator, world.host.id, key.id)
    revoked = await client.post(REDEEM, json={"claim_code": code}, headers=bearer(secret))
    assert revoked.status_code == 401


async def test_host_keys_are_shown_once_listed_by_last4_and_revoked_through_the_api(
    world: World, client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    created = await client.post(f"{API}/hosts/agent/keys", json={"name": "cloud run"}, headers=owner_headers)
    assert created.status_code == 201, created.text
    secret, key = created.json()["secret"], created.json()["key"]
    assert token_format.well_formed(secret, token_format.HOST_KEY_PREFIX) and key["last4"] == secret[-4:]
    listed = (await client.get(f"{API}/hosts/agent/keys", headers=owner_headers)).json()["items"]
    assert [k["id"] for k in listed] == [key["id"]] and secret not in str(listed)
    revoked = await client.delete(f"{API}/hosts/agent/keys/{key['id']}", headers=owner_headers)
    assert revoked.status_code == 204
    (after,) = (await client.get(f"{API}/hosts/agent/keys", headers=owner_headers)).json()["items"]
    assert after["revoked_at"] is not None
    assert (await world.rows(schema.host_keys))[0].digest == world.hasher.digest(secret)


async def test_webhook_endpoints_through_the_api(
    world: World, client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        base_path = f"{API}/hosts/agent/webhooks"
        body: dict[str, Any] = {"url": base + "/hook", "event_types": ["host.disabled"], "token_delivery": "token"}
        created = await client.post(base_path, json=body, headers=owner_headers)
        assert created.status_code == 201, created.text
        endpoint, secret = created.json()["endpoint"], created.json()["secret"]
        receiver.secrets.append(secret)
        assert endpoint["event_types"] == ["host.disabled"] and len(endpoint["secrets"]) == 1
        assert created.headers["location"].endswith(endpoint["id"])
        one = f"{base_path}/{endpoint['id']}"

        tested = await client.post(f"{one}/test", headers=owner_headers)
        assert tested.status_code == 200 and tested.json()["outcome"] == "delivered", tested.text
        assert receiver.received[-1].verified_by == (0,)

        stale = await client.patch(one, json={"enabled": False}, headers={**owner_headers, "If-Match": '"9"'})
        assert stale.status_code == 412
        bad = await client.patch(one, json={"url": "ftp://agent.example.com/hook"}, headers=owner_headers)
        assert bad.status_code == 422 and problem_of(bad)["code"] == "url_refused"
        bad_types = await client.patch(one, json={"event_types": ["nope"]}, headers=owner_headers)
        assert bad_types.status_code == 422

        rotated = await client.post(f"{one}/rotate-secret", json={"overlap_hours": 2}, headers=owner_headers)
        assert rotated.status_code == 200 and rotated.json()["secret"] != secret
        assert len(rotated.json()["endpoint"]["secrets"]) == 2
        retired = await client.post(f"{one}/retire-old-secrets", headers=owner_headers)
        assert len(retired.json()["secrets"]) == 1

        events = (await client.get(f"{one}/events", headers=owner_headers)).json()["items"]
        deliveries = (await client.get(f"{one}/deliveries", headers=owner_headers)).json()["items"]
        assert [e["event_type"] for e in events] == ["webhook.test"] and events[0]["status"] == "delivered"
        assert [(d["trigger"], d["status_code"]) for d in deliveries] == [("test", 204)]
        assert (await client.delete(one, headers=owner_headers)).status_code == 204
        assert (await client.get(base_path, headers=owner_headers)).json() == []
    refused = await client.post(base_path, json={"url": "https://10.0.0.1/hook", "nope": 1}, headers=owner_headers)
    assert refused.status_code == 422
