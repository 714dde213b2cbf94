"""Tokens about to expire: their host hears it once (token.expiring) and, when it takes tokens by webhook, gets a
successor (token.minted) that the agent moves to without anyone copying a token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import time_machine

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.connections import AccessToken, Connection
from bastion.domain.webhooks import EventType, TokenDelivery
from bastion.services import connections, hosts, janitor, tokens
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import Lifetimes
from tests.webhooks.support import ADA, World, build_world

pytestmark = pytest.mark.anyio
T = schema.access_tokens
LIFETIME = timedelta(days=2)  # announced half a day ahead: a quarter of its lifetime


@pytest.fixture
async def world(store: Store, hasher: KeyHasher, operator: Actor) -> World:
    return await build_world(store, hasher, operator)


async def _connect(world: World, expires_at: datetime, *, used: bool = True) -> tuple[Connection, AccessToken, str]:
    """Ada's connection to the host through "sales", with a token that expires at ``expires_at`` and, when
    ``used``, has been used (only a token in use is succeeded)."""
    made = await connections.create(
        world.store, world.hasher, world.operator, host=world.host.name, gateway="sales", member=ADA,
        token_expires_at=expires_at,
    )  # fmt: skip
    if used:
        async with world.store.transaction() as conn:
            await conn.execute(T.update().where(T.c.id == made[1].id).values(last_used_at=datetime.now(UTC)))
    return made


async def _token(world: World, token_id: str) -> sa.Row[object]:
    (row,) = await world.rows(T, T.c.id == token_id)
    return row


def _opened(world: World, row: sa.Row[object]) -> str:
    opened = world.vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed).token  # type: ignore[attr-defined]
    assert opened is not None
    return opened


def test_a_token_is_announced_a_quarter_of_its_lifetime_ahead_and_at_most_a_week() -> None:
    minted = datetime(2026, 1, 1, tzinfo=UTC)
    assert tokens.expiring_from(minted, minted + LIFETIME) == minted + LIFETIME - timedelta(hours=12)
    assert tokens.expiring_from(minted, minted + timedelta(days=365)) == minted + timedelta(days=358)


async def test_a_token_due_is_announced_once_with_a_successor_the_host_receives(world: World) -> None:
    endpoint, _secret = await world.endpoint("https://a.example.com", delivery=TokenDelivery.TOKEN)
    now = datetime.now(UTC)
    connection, token, _ = await _connect(world, now + LIFETIME)
    assert await tokens.announce_expiring(world.store, world.hasher, now=now + timedelta(hours=35)) == 0  # not due
    with time_machine.travel(now + timedelta(hours=37), tick=True):  # the successor is minted then, as in life
        assert await tokens.announce_expiring(world.store, world.hasher) == 1
        assert await tokens.announce_expiring(world.store, world.hasher) == 0  # once, and the successor not yet
    old = await _token(world, token.id)
    assert old.expiry_noticed_at is not None and old.successor_id is not None and old.revoked_at is None
    successor = await _token(world, old.successor_id)
    assert successor.connection_id == connection.id and successor.revoked_at is None
    assert successor.expires_at - successor.created_at == pytest.approx(LIFETIME, abs=timedelta(seconds=5))
    events = [r for r in await world.outbox() if r.event_type != EventType.CONNECTION_CREATED.value]
    assert [(r.event_type, r.token_id, r.endpoint_id) for r in events] == [
        ("token.minted", successor.id, endpoint.id),
        ("token.expiring", token.id, endpoint.id),
    ]
    minted, expiring = events
    # The successor reaches the host sealed in the outbox, and it is the token the successor row digests.
    assert world.hasher.digest(_opened(world, minted)) == successor.digest
    data = expiring.payload["data"]
    assert data["successor_token_id"] == successor.id and data["token"] is None
    assert datetime.fromisoformat(data["expires_at"]) == old.expires_at
    audit = await world.rows(schema.audit_events, schema.audit_events.c.method.in_(("token.expiring", "token.minted")))
    assert sorted(e.method for e in audit) == ["token.expiring", "token.minted"]


async def test_without_an_endpoint_taking_tokens_it_is_announced_without_a_successor(world: World) -> None:
    endpoint, _secret = await world.endpoint("https://a.example.com", types=["token.expiring"])
    now = datetime.now(UTC)
    _connection, token, _ = await _connect(world, now + LIFETIME)
    assert await tokens.announce_expiring(world.store, world.hasher, now=now + timedelta(hours=37)) == 1
    assert (await _token(world, token.id)).successor_id is None
    assert len(await world.rows(T)) == 1  # nobody would receive a successor: none is minted
    (event,) = await world.outbox()
    assert (event.event_type, event.endpoint_id, event.payload["data"]["successor_token_id"]) == (
        "token.expiring",
        endpoint.id,
        None,
    )


async def test_revoked_unused_and_disabled_connections_tokens_get_no_successor(world: World) -> None:
    await world.endpoint("https://a.example.com", delivery=TokenDelivery.TOKEN)
    now = datetime.now(UTC)
    (_c, revoked, _), (disabled_connection, disabled, _) = [await _connect(world, now + LIFETIME) for _ in range(2)]
    _c, unused, _ = await _connect(world, now + LIFETIME, used=False)
    await tokens.revoke(world.store, world.operator, revoked.id)
    await connections.set_enabled(world.store, world.operator, disabled_connection.id, enabled=False)
    assert await tokens.announce_expiring(world.store, world.hasher, now=now + timedelta(hours=37)) == 2
    assert (await _token(world, revoked.id)).expiry_noticed_at is None
    for announced in (disabled, unused):  # told it expires; nobody uses the one, the other is switched off
        row = await _token(world, announced.id)
        assert row.expiry_noticed_at is not None and row.successor_id is None
    assert len(await world.rows(T)) == 3
    # Past its expiry a token is no longer announced: it is refused at the gateway instead.
    assert await tokens.announce_expiring(world.store, world.hasher, now=now + LIFETIME + timedelta(seconds=1)) == 0


async def test_a_disabled_host_gets_no_successor_and_revoking_a_token_revokes_its_successor(world: World) -> None:
    await world.endpoint("https://a.example.com", delivery=TokenDelivery.TOKEN)
    now = datetime.now(UTC)
    _c, first, _ = await _connect(world, now + LIFETIME)
    await hosts.set_enabled(world.store, world.operator, world.host.name, enabled=False)
    assert await tokens.announce_expiring(world.store, world.hasher, now=now + timedelta(hours=37)) == 1
    assert (await _token(world, first.id)).successor_id is None

    await hosts.set_enabled(world.store, world.operator, world.host.name, enabled=True)
    _c, second, _ = await _connect(world, now + LIFETIME)
    with time_machine.travel(now + timedelta(hours=37), tick=True):
        assert await tokens.announce_expiring(world.store, world.hasher) == 1
    successor_id = (await _token(world, second.id)).successor_id
    assert successor_id is not None
    # An admin who revokes the token cuts the agent off: the successor Bastion minted for it goes too.
    await tokens.revoke(world.store, world.operator, second.id)
    assert (await _token(world, successor_id)).revoked_at is not None
    revoked = [r.token_id for r in await world.outbox() if r.event_type == "token.revoked"]
    assert revoked == [second.id, successor_id]


async def test_the_janitor_announces_tokens_with_its_sweep(world: World) -> None:
    await world.endpoint("https://a.example.com", delivery=TokenDelivery.TOKEN)
    soon = datetime.now(UTC) + timedelta(minutes=4)
    await _connect(world, soon)
    async with world.store.transaction() as conn:  # as if minted 20 minutes ago: announced 6 minutes ahead, so due
        await conn.execute(T.update().values(created_at=soon - timedelta(minutes=24)))
    swept = await janitor.sweep(world.store, Lifetimes(), hasher=world.hasher)
    assert swept.expiring == 1
    assert (await janitor.sweep(world.store, Lifetimes(), hasher=world.hasher)).expiring == 0
