"""The outbox: events are written by the transaction that makes the change, carry versions, and keep no token in
the clear; a host's webhook URL is its first endpoint."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens as token_format
from bastion.domain.actor import Actor
from bastion.domain.specs import HostSpec
from bastion.domain.webhooks import SUBSCRIBABLE, TokenDelivery
from bastion.services import connections, endpoints, hosts, members, outbox, rotation, tokens, webhooks
from bastion.services.apikeys import KeyHasher
from tests.webhooks.support import ADA, GATEWAY, World, build_world

pytestmark = pytest.mark.anyio
OUTBOX = schema.webhook_outbox
URL = "https://agent.example.com/hook"


@pytest.fixture
async def world(store: Store, hasher: KeyHasher, operator: Actor) -> World:
    return await build_world(store, hasher, operator)


async def _dump(store: Store) -> str:
    parts: list[str] = []
    async with store.transaction() as conn:
        for table in schema.metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                parts.extend(v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row)
    return "\n".join(parts)


def _opened(world: World, row: sa.Row[object]) -> str:
    opened = world.vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed).token  # type: ignore[attr-defined]
    assert opened is not None
    return opened


async def test_a_host_without_endpoints_gets_no_events(world: World) -> None:
    await world.connect()
    assert await world.outbox() == []


async def test_each_endpoint_gets_the_event_with_one_shared_webhook_id_and_no_token_in_the_clear(world: World) -> None:
    claiming, _ = await world.endpoint("https://a.example.com")
    direct, _ = await world.endpoint("https://b.example.com", delivery=TokenDelivery.TOKEN)
    connection, token, secret = await world.connect()
    rows = await world.outbox()
    assert {r.endpoint_id for r in rows} == {claiming.id, direct.id}
    assert {r.event_id for r in rows} == {rows[0].event_id} and {r.event_type for r in rows} == {"connection.created"}
    assert all(r.connection_id == connection.id and r.token_id == token.id and r.version == 1 for r in rows)
    by_endpoint = {r.endpoint_id: r for r in rows}
    assert by_endpoint[direct.id].secret_kind == "token" and _opened(world, by_endpoint[direct.id]) == secret
    code = _opened(world, by_endpoint[claiming.id])
    assert by_endpoint[claiming.id].secret_kind == "claim_code"
    assert token_format.well_formed(code, token_format.CLAIM_CODE_PREFIX)
    (claim,) = await world.rows(schema.claim_codes)
    assert claim.digest == world.hasher.digest(code) and claim.token_id == token.id and claim.host_id == world.host.id
    dump = await _dump(world.store)
    assert secret not in dump and code not in dump


async def test_a_change_rolled_back_leaves_no_event(world: World) -> None:
    await world.endpoint("https://a.example.com")
    ada = await world.rows(schema.members, schema.members.c.email == ADA)
    with pytest.raises(RuntimeError, match="after the event"):
        async with world.store.transaction() as conn:
            await connections.provision(
                conn, world.hasher, world.operator, member_id=ada[0].id, host=world.host.id, gateway=GATEWAY
            )
            assert len((await conn.execute(sa.select(OUTBOX))).all()) == 1
            raise RuntimeError("failed after the event was written")
    assert await world.outbox() == [] and await world.rows(schema.claim_codes) == []
    assert await world.rows(schema.connections) == []


async def test_events_about_a_connection_carry_increasing_versions_and_host_events_their_own(world: World) -> None:
    await world.endpoint("https://a.example.com")
    connection, first, _secret = await world.connect()
    second, _ = await connections.mint_token(world.store, world.hasher, world.operator, connection.id)
    await connections.set_enabled(world.store, world.operator, connection.id, False)
    await connections.set_enabled(world.store, world.operator, connection.id, True)
    await tokens.revoke(world.store, world.operator, first.id)
    await hosts.set_enabled(world.store, world.operator, world.host.id, False)
    await hosts.set_enabled(world.store, world.operator, world.host.id, True)
    seen = [(r.event_type, r.version, r.token_id) for r in await world.outbox()]
    assert seen == [
        ("connection.created", 1, first.id),
        ("token.minted", 2, second.id),
        ("connection.disabled", 3, None),
        ("connection.enabled", 4, None),
        ("token.revoked", 5, first.id),
        ("host.disabled", 1, None),
        ("host.enabled", 2, None),
    ]


async def test_endpoints_get_only_the_types_they_subscribe_to_and_none_while_disabled(world: World) -> None:
    revocations, _ = await world.endpoint("https://a.example.com", types=["token.revoked"])
    paused, _ = await world.endpoint("https://b.example.com", enabled=False)
    _connection, token, _secret = await world.connect()
    await tokens.revoke(world.store, world.operator, token.id)
    rows = await world.outbox()
    assert [(r.endpoint_id, r.event_type) for r in rows] == [(revocations.id, "token.revoked")]
    assert paused.id not in {r.endpoint_id for r in rows}


async def test_revoking_a_token_erases_every_sealed_copy_still_waiting(world: World) -> None:
    await world.endpoint("https://a.example.com")
    await world.endpoint("https://b.example.com", delivery=TokenDelivery.TOKEN)
    _connection, token, _secret = await world.connect()
    assert all(r.kek_id is not None for r in await world.outbox())
    await tokens.revoke(world.store, world.operator, token.id)
    created = [r for r in await world.outbox() if r.event_type == "connection.created"]
    assert len(created) == 2 and all(r.secret_sealed is None and r.secret_kind is None for r in created)
    assert await world.rows(schema.claim_codes) == []


async def test_deleting_a_connection_tells_the_host_each_live_token_is_revoked(world: World) -> None:
    await world.endpoint("https://a.example.com")
    connection, first, _ = await world.connect()
    second, _ = await connections.mint_token(world.store, world.hasher, world.operator, connection.id)
    await tokens.revoke(world.store, world.operator, first.id)
    await connections.delete(world.store, world.operator, connection.id)
    revoked = [(r.token_id, r.version) for r in await world.outbox() if r.event_type == "token.revoked"]
    assert revoked == [(first.id, 3), (second.id, 4)]


async def test_deleting_a_member_tells_the_host_each_of_their_live_tokens_is_revoked(world: World) -> None:
    await world.endpoint("https://a.example.com")
    connection, first, _ = await world.connect()
    second, _ = await connections.mint_token(world.store, world.hasher, world.operator, connection.id)
    await members.delete(world.store, world.operator, ADA)
    revoked = [(r.token_id, r.connection_id) for r in await world.outbox() if r.event_type == "token.revoked"]
    assert revoked == [(first.id, connection.id), (second.id, connection.id)]
    assert await world.rows(schema.connections) == []


async def test_a_host_s_webhook_url_is_its_first_endpoint_and_waits_for_a_secret(world: World) -> None:
    host = await hosts.create(world.store, world.operator, HostSpec("crm-agent", webhook_url=URL))
    (endpoint,) = await webhooks.list_endpoints(world.store, world.operator, host.id)
    assert (endpoint.url, endpoint.from_host, endpoint.secrets) == (URL, True, ())
    assert endpoint.token_delivery is TokenDelivery.CLAIM_CODE and endpoint.event_types == SUBSCRIBABLE

    await hosts.update(world.store, world.operator, host.id, {"webhook_url": URL + "/v2"})
    (moved,) = await webhooks.list_endpoints(world.store, world.operator, host.id)
    assert (moved.id, moved.url) == (endpoint.id, URL + "/v2")

    renamed = await webhooks.update_endpoint(world.store, world.operator, host.id, endpoint.id, {"url": URL + "/v3"})
    current = await hosts.get(world.store, world.operator, host.id)
    assert (renamed.url, current.webhook_url, current.version) == (URL + "/v3", URL + "/v3", 3)

    await hosts.update(world.store, world.operator, host.id, {"webhook_url": None})
    assert await webhooks.list_endpoints(world.store, world.operator, host.id) == []
    await hosts.update(world.store, world.operator, host.id, {"webhook_url": URL})
    (again,) = await webhooks.list_endpoints(world.store, world.operator, host.id)
    await webhooks.delete_endpoint(world.store, world.operator, host.id, again.id)
    assert (await hosts.get(world.store, world.operator, host.id)).webhook_url is None


async def test_an_endpoint_without_a_secret_keeps_its_events_until_one_is_rotated_in(world: World) -> None:
    await hosts.update(world.store, world.operator, world.host.id, {"webhook_url": URL})
    await world.connect()
    (row,) = await world.outbox()
    assert row.status == "pending"
    assert await outbox.lease_due(world.store, "w", row.next_attempt_at, limit=10, lease=outbox.HISTORY_RETENTION) == []
    (endpoint,) = await webhooks.list_endpoints(world.store, world.operator, world.host.id)
    _endpoint, secret = await webhooks.rotate_secret(
        world.store, world.vault, world.operator, world.host.id, endpoint.id
    )
    assert secret.startswith("whsec_")
    (leased,) = await outbox.lease_due(world.store, "w", row.next_attempt_at, limit=10, lease=outbox.HISTORY_RETENTION)
    assert leased.id == row.id


async def test_a_worker_sleeps_until_a_row_it_could_take_is_due(world: World) -> None:
    """Rows waiting for a secret, an enabled endpoint or another worker's lease must not wake it over and over."""
    await hosts.update(world.store, world.operator, world.host.id, {"webhook_url": URL})
    await world.connect()
    (row,) = await world.outbox()
    now = row.next_attempt_at + timedelta(seconds=1)
    assert await outbox.next_due(world.store, now) is None  # no secret yet
    (endpoint,) = await webhooks.list_endpoints(world.store, world.operator, world.host.id)
    await webhooks.rotate_secret(world.store, world.vault, world.operator, world.host.id, endpoint.id)
    assert await outbox.next_due(world.store, now) == row.next_attempt_at
    await outbox.lease_due(world.store, "other", now, limit=10, lease=timedelta(minutes=1))
    assert await outbox.next_due(world.store, now) == now + timedelta(minutes=1)
    await webhooks.update_endpoint(world.store, world.operator, world.host.id, endpoint.id, {"enabled": False})
    assert await outbox.next_due(world.store, now) is None


async def test_rotation_keeps_at_most_two_live_secrets_and_retire_old_keeps_the_newest(world: World) -> None:
    endpoint, first = await world.endpoint("https://a.example.com")
    rotate = webhooks.rotate_secret
    _e, second = await rotate(world.store, world.vault, world.operator, world.host.id, endpoint.id)
    _e, third = await rotate(world.store, world.vault, world.operator, world.host.id, endpoint.id)
    assert len({first, second, third}) == 3
    live = await webhooks.get_endpoint(world.store, world.operator, world.host.id, endpoint.id)
    assert len(live.secrets) == 2 and live.secrets[0].expires_at is None and live.secrets[1].expires_at is not None
    async with world.store.transaction() as conn:
        now = live.secrets[0].created_at
        assert await endpoints.live_secrets(conn, world.vault, endpoint.id, now) == [third, second]
    retired = await webhooks.retire_old_secrets(world.store, world.operator, world.host.id, endpoint.id)
    assert [s.id for s in retired.secrets] == [live.secrets[0].id]
    dump = await _dump(world.store)
    assert first not in dump and second not in dump and third not in dump


async def test_a_secret_and_a_code_are_sealed_under_their_own_row_and_rotation_rewraps_them(world: World) -> None:
    await world.endpoint("https://a.example.com")
    await world.connect()
    assert await rotation.remaining(world.store, world.vault) == 0
    usage = {u.key_id: u.rows for u in await rotation.usage(world.store, world.vault)}
    # One signing secret, one sealed claim code in the outbox, one sealed token behind the claim.
    assert usage == {world.vault.keyring.primary_id: 3}
