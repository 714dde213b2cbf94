"""Delivering to a real receiver: every event verifies with the official verifier, retries keep the webhook-id and
back off with jitter for 24 hours, redirects fail, an endpoint down for a while loses nothing, order is kept."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
import time_machine
from standardwebhooks.webhooks import WebhookVerificationError

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens as token_format
from bastion.domain import webhooks as wh
from bastion.domain.actor import Actor
from bastion.domain.webhooks import TokenDelivery
from bastion.net.outbound import OutboundPolicy
from bastion.services import connections, hosts, tokens, webhooks
from bastion.services.apikeys import KeyHasher
from bastion.services.delivery import Worker
from tests.mcp_support import serving
from tests.processes import free_port
from tests.webhooks.receiver import Receiver, verify
from tests.webhooks.support import ADA, GATEWAY, PUBLIC_URL, World, build_world, drain, worker

pytestmark = pytest.mark.anyio
DELIVERIES = schema.webhook_deliveries


@pytest.fixture
async def world(store: Store, hasher: KeyHasher, operator: Actor) -> World:
    return await build_world(store, hasher, operator)


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(datetime.now(UTC), tick=False) as traveller:
        yield traveller


async def test_every_delivery_verifies_and_a_retry_keeps_the_webhook_id(world: World) -> None:
    receiver = Receiver(status=503)
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        _endpoint, secret = await world.endpoint(base)
        receiver.secrets.append(secret)
        connection, token, _secret = await world.connect()
        assert await drain(found, post) == 1
        (row,) = await world.outbox()
        assert (row.status, row.attempts, row.last_error) == ("pending", 1, "http_status 503")

        receiver.status = 204
        with time_machine.travel(row.next_attempt_at, tick=False):
            assert await drain(found, post) == 1
            (first, second) = receiver.received
            assert first.verified_by == second.verified_by == (0,)
            assert first.webhook_id == second.webhook_id == wh.message_id(row.event_id)
            event = verify(secret, second)
    data = event["data"]
    assert event["type"] == "connection.created"
    assert (data["connection_id"], data["token_id"], data["version"]) == (connection.id, token.id, 1)
    assert (data["host"], data["gateway"], data["mcp_url"]) == (world.host.name, GATEWAY, f"{PUBLIC_URL}/g/sales/mcp")
    assert data["member"]["email"] == ADA and data["token"] is None
    assert token_format.well_formed(data["claim_code"], token_format.CLAIM_CODE_PREFIX)
    # The claim code is good for ten minutes from the attempt that delivered it.
    sent = datetime.fromtimestamp(int(second.headers["webhook-timestamp"]), UTC)
    expires = datetime.fromisoformat(data["claim_expires_at"])
    assert timedelta(minutes=10) <= expires - sent < timedelta(minutes=10, seconds=1)

    (delivered,) = await world.outbox()
    assert (delivered.status, delivered.attempts, delivered.secret_sealed, delivered.kek_id) == (
        "delivered",
        2,
        None,
        None,
    )
    log = sorted(await world.rows(DELIVERIES), key=lambda r: r.attempt)
    assert [(r.attempt, r.status_code, r.error, r.outcome, r.trigger) for r in log] == [
        (1, 503, "http_status 503", "failed", "scheduled"),
        (2, 204, None, "delivered", "scheduled"),
    ]


async def test_token_delivery_hands_over_the_token_itself(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        _endpoint, secret = await world.endpoint(base, delivery=TokenDelivery.TOKEN)
        receiver.secrets.append(secret)
        _connection, token, plaintext = await world.connect()
        await drain(found, post)
    (got,) = receiver.received
    assert got.verified_by == (0,)
    assert (got.data["token"], got.data["token_id"], got.data["claim_code"]) == (plaintext, token.id, None)


async def test_during_a_rotation_both_secrets_verify_and_after_retiring_only_the_new_one(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        endpoint, old = await world.endpoint(base)
        _endpoint, new = await webhooks.rotate_secret(
            world.store, world.vault, world.operator, world.host.id, endpoint.id
        )
        receiver.secrets += [old, new]
        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        await drain(found, post)
        await webhooks.retire_old_secrets(world.store, world.operator, world.host.id, endpoint.id)
        await hosts.set_enabled(world.store, world.operator, world.host.id, True)
        await drain(found, post)
    during, after = receiver.received
    assert during.event["type"] == "host.disabled" and during.verified_by == (0, 1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert after.event["type"] == "host.enabled" and after.verified_by == (1,)
    assert (during.data["version"], after.data["version"]) == (1, 2)


async def test_a_six_minute_old_delivery_replayed_is_rejected_by_the_verifier(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        _endpoint, secret = await world.endpoint(base)
        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        await drain(found, post)
    (captured,) = receiver.received
    assert verify(secret, captured)["type"] == "host.disabled"
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=6)), pytest.raises(WebhookVerificationError):
        verify(secret, captured)


async def test_a_redirecting_endpoint_counts_as_failed_and_is_not_followed(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        receiver.redirect_to = base + "/elsewhere"
        await world.endpoint(base)
        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        await drain(found, post)
    assert len(receiver.received) == 1 and receiver.followed == 0
    (row,) = await world.outbox()
    (attempt,) = await world.rows(DELIVERIES)
    assert (attempt.status_code, attempt.error, attempt.outcome) == (302, "redirect 302", "failed")
    assert (row.status, row.failures) == ("pending", 1)


async def test_retries_back_off_with_full_jitter_for_at_least_24_hours_then_the_event_fails(
    world: World, clock: time_machine.Traveller
) -> None:
    receiver = Receiver(status=503)
    attempts: list[datetime] = []
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        await world.endpoint(base)
        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        while True:
            assert await drain(found, post) == 1
            attempts.append(datetime.now(UTC))
            (row,) = await world.outbox()
            if row.status != "pending":
                break
            assert row.next_attempt_at > attempts[-1]
            clock.move_to(row.next_attempt_at - timedelta(milliseconds=1))
            assert await drain(found, post) == 0  # not due yet: nothing is attempted early
            clock.move_to(row.next_attempt_at)
        clock.move_to(datetime.now(UTC) + timedelta(days=2))
        assert await drain(found, post) == 0
    assert row.status == "failed" and row.attempts == len(attempts) == len(receiver.received)
    assert attempts[-1] - attempts[0] >= wh.RETRY_WINDOW
    for n, (before, after) in enumerate(itertools.pairwise(attempts), start=1):
        ceiling = min(wh.RETRY_CAP, wh.RETRY_BASE * 2 ** min(n - 1, 20))
        assert wh.RETRY_FLOOR <= after - before <= max(ceiling, wh.RETRY_FLOOR), n
    gaps = [b - a for a, b in itertools.pairwise(attempts[10:])]
    assert min(gaps) < wh.RETRY_CAP / 4 < wh.RETRY_CAP * 3 / 4 < max(gaps)  # jittered, not a fixed step
    assert len({r.webhook_id for r in receiver.received}) == 1


async def test_an_endpoint_down_for_a_while_gets_every_event_in_order_once_it_is_back(
    world: World, clock: time_machine.Traveller
) -> None:
    port = free_port()
    receiver = Receiver()
    async with worker(world) as (found, post):
        _endpoint, secret = await world.endpoint(f"http://127.0.0.1:{port}")
        receiver.secrets.append(secret)
        connection, first, _ = await world.connect()
        await connections.mint_token(world.store, world.hasher, world.operator, connection.id)
        await connections.set_enabled(world.store, world.operator, connection.id, False)
        await connections.set_enabled(world.store, world.operator, connection.id, True)
        await tokens.revoke(world.store, world.operator, first.id)
        for _ in range(6):  # down: each round attempts the oldest event only; the rest wait behind it
            assert await drain(found, post) == 5
            rows = await world.outbox()
            assert [r.attempts for r in rows][1:] == [0, 0, 0, 0]
            assert {r.next_attempt_at for r in rows} == {rows[0].next_attempt_at}
            clock.move_to(rows[0].next_attempt_at)
        async with serving(receiver.app(), port=port):
            assert await drain(found, post) == 5
    assert [r.data["version"] for r in receiver.received] == [1, 2, 3, 4, 5]
    types = [r.event["type"] for r in receiver.received]
    assert types == ["connection.created", "token.minted", "connection.disabled", "connection.enabled", "token.revoked"]
    assert all(r.verified_by == (0,) for r in receiver.received)
    assert len({r.webhook_id for r in receiver.received}) == 5
    assert {r.status for r in await world.outbox()} == {"delivered"}
    log = await world.rows(DELIVERIES)
    assert len(log) == 6 + 5 and sorted(r.error or "" for r in log)[-6:] == ["ConnectError"] * 6


async def test_a_disabled_endpoint_keeps_its_events_until_it_is_enabled(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        endpoint, _secret = await world.endpoint(base)
        await webhooks.update_endpoint(world.store, world.operator, world.host.id, endpoint.id, {"enabled": False})
        # Disabled before the event: it is not queued for this endpoint. Disabled after: it waits.
        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        await webhooks.update_endpoint(world.store, world.operator, world.host.id, endpoint.id, {"enabled": True})
        await hosts.set_enabled(world.store, world.operator, world.host.id, True)
        await webhooks.update_endpoint(world.store, world.operator, world.host.id, endpoint.id, {"enabled": False})
        assert await drain(found, post) == 0
        await webhooks.update_endpoint(world.store, world.operator, world.host.id, endpoint.id, {"enabled": True})
        assert await drain(found, post) == 1
    assert [r.event["type"] for r in receiver.received] == ["host.enabled"]


async def test_the_outbound_policy_decides_at_delivery_time(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world, policy=OutboundPolicy()) as (found, post):
        await world.endpoint(base)  # http://127.0.0.1: a shape some settings allow, refused by these
        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        await drain(found, post)
    assert receiver.received == []
    (attempt,) = await world.rows(DELIVERIES)
    assert attempt.error == "url_refused (loopback)" and attempt.outcome == "failed"


async def test_test_events_and_redeliveries_are_attempted_at_once_and_logged(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base, worker(world) as (found, post):
        endpoint, secret = await world.endpoint(base)
        receiver.secrets.append(secret)
        sender = world.sender()
        tested = await webhooks.send_test(world.store, sender, world.operator, world.host.id, endpoint.id)
        assert (tested.trigger, tested.outcome, tested.status_code, tested.attempt) == ("test", "delivered", 204, 1)
        assert receiver.received[-1].event["type"] == "webhook.test" and receiver.received[-1].verified_by == (0,)

        await hosts.set_enabled(world.store, world.operator, world.host.id, False)
        await world.connect()
        await drain(found, post)
        by_type = {r.event_type: r for r in await world.outbox()}
        again = await webhooks.redeliver(
            world.store, sender, world.operator, world.host.id, endpoint.id, by_type["host.disabled"].id
        )
        assert (again.trigger, again.outcome, again.attempt) == ("manual", "delivered", 2)
        ids = [r.webhook_id for r in receiver.received]
        assert ids[-1] == wh.message_id(by_type["host.disabled"].event_id) and ids.count(ids[-1]) == 2
        with pytest.raises(Exception, match="no longer kept") as refused:
            await webhooks.redeliver(
                world.store, sender, world.operator, world.host.id, endpoint.id, by_type["connection.created"].id
            )
        assert getattr(refused.value, "code", None) == "conflict"


async def test_a_running_worker_delivers_as_soon_as_the_change_commits(world: World) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        _endpoint, secret = await world.endpoint(base)
        receiver.secrets.append(secret)
        running = Worker(world.store, world.sender(), poll_s=3600)  # no poll would come in time: the commit wakes it
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(running.run)
            await world.connect()
            with anyio.fail_after(10):
                (got,) = await receiver.wait_for(1)
            await hosts.set_enabled(world.store, world.operator, world.host.id, False)
            with anyio.fail_after(10):
                later = (await receiver.wait_for(2))[1]
            tasks.cancel_scope.cancel()
    assert got.event["type"] == "connection.created" and later.event["type"] == "host.disabled"
    assert got.verified_by == later.verified_by == (0,)
