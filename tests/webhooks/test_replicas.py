"""Several workers on one PostgreSQL database: a row locked or leased by one is skipped by the others, so each event
is attempted once per attempt, however many replicas drain the outbox together."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import HostSpec
from bastion.services import hosts, outbox, webhooks, workspace
from bastion.services.apikeys import KeyHasher
from bastion.services.audit import AuditKeys
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault
from tests.mcp_support import serving
from tests.webhooks.receiver import PATH, Receiver
from tests.webhooks.support import World, build_world, drain, worker

pytestmark = pytest.mark.anyio
EVENTS = 24


@pytest.fixture
def hasher() -> KeyHasher:
    return KeyHasher(secrets.token_bytes(32))


@pytest.fixture
async def replicas(pg_store: Store, pg_migrated_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on the same PostgreSQL database, as two replicas have (sharing their keys, as replicas do)."""
    vault = Vault(Keyring({"k1": secrets.token_bytes(32)}, "k1"))
    pg_store.vault = vault
    other = Store.from_url(pg_migrated_url, audit=AuditKeys.from_secret(secrets.token_bytes(32)).chain_keys())
    other.vault = vault
    try:
        yield pg_store, other
    finally:
        await other.close()


async def _world(store: Store, hasher: KeyHasher) -> World:
    return await build_world(store, hasher, Actor.local_operator((await workspace.default_workspace(store)).id))


async def _host_events(world: World, base_url: str, count: int) -> None:
    """``count`` host events, from as many hosts (one event each, so no ordering ties them together)."""
    for n in range(count):
        extra = await hosts.create(world.store, world.operator, HostSpec(f"agent-{n}"))
        await webhooks.create_endpoint(world.store, world.vault, world.operator, extra.id, url=base_url + PATH)
        await hosts.set_enabled(world.store, world.operator, extra.id, False)


async def test_a_row_one_replica_holds_is_skipped_by_another_not_waited_for(
    replicas: tuple[Store, Store], hasher: KeyHasher
) -> None:
    first, second = replicas
    world = await _world(first, hasher)
    await _host_events(world, "https://agent.example.com", 4)
    now = datetime.now(UTC) + timedelta(seconds=1)
    o = schema.webhook_outbox
    async with first.engine.connect() as holder:
        await holder.begin()
        locked = (await holder.execute(sa.select(o.c.id).order_by(o.c.id).limit(2).with_for_update())).scalars().all()
        with anyio.fail_after(5):  # SKIP LOCKED: the other replica does not wait for the lock
            taken = await outbox.lease_due(second, "second", now, limit=10, lease=timedelta(minutes=1))
        await holder.rollback()
    assert len(locked) == 2 and len(taken) == 2 and not {m.id for m in taken} & set(locked)
    # Leased rows are not taken again until their lease runs out, even once nothing locks them.
    again = await outbox.lease_due(first, "first", now, limit=10, lease=timedelta(minutes=1))
    assert {m.id for m in again} == set(locked)
    assert await outbox.lease_due(second, "second", now, limit=10, lease=timedelta(minutes=1)) == []
    later = await outbox.lease_due(second, "second", now + timedelta(minutes=2), limit=10, lease=timedelta(minutes=1))
    assert len(later) == 4


async def test_two_workers_on_one_postgresql_deliver_each_event_once(
    replicas: tuple[Store, Store], hasher: KeyHasher
) -> None:
    first, second = replicas
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        world = await _world(first, hasher)
        await _host_events(world, base, EVENTS)
        twin = World(second, hasher, world.vault, world.operator, world.host)
        async with worker(world, seed=1) as (a, post_a), worker(twin, seed=2) as (b, post_b):
            a.batch = b.batch = 3
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(drain, a, post_a)
                tasks.start_soon(drain, b, post_b)
    counts = Counter(r.webhook_id for r in receiver.received)
    assert len(counts) == EVENTS and set(counts.values()) == {1}
    log = await world.rows(schema.webhook_deliveries)
    assert len(log) == EVENTS and {r.attempt for r in log} == {1}
    assert {r.status for r in await world.outbox()} == {"delivered"}
