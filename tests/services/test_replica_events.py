"""Changes made on one replica reach another replica's token cache through PostgreSQL LISTEN/NOTIFY."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from bastion import wiring
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.errors import Unauthenticated
from bastion.events import pg as pg_events
from bastion.events.bus import Changed, Subject
from bastion.services import connections, gateways, hosts, identities, members, servers, tokens
from bastion.services.apikeys import KeyHasher
from bastion.services.principals import HostDisabled, Resolver
from bastion.settings import Settings
from tests.worlds import ada_connected

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_url(pg_migrated_url: str) -> str:
    from tests.conftest import empty_all

    empty_all(pg_migrated_url)
    return pg_migrated_url


async def test_host_disable_and_token_revoke_on_one_replica_reach_the_other(
    pg_url: str, vault: Any, hasher: KeyHasher, settings: Settings
) -> None:
    from bastion.services import workspace

    # Replicas of one install share its audit key: they append to one chain.
    keys = wiring.chain_keys_from(settings)
    replica_a, replica_b = Store.from_url(pg_url, audit=keys), Store.from_url(pg_url, audit=keys)
    try:
        operator = Actor.local_operator((await workspace.ensure_workspace(replica_a)).id)
        await servers.create(
            replica_a, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp")
        )
        await gateways.create(replica_a, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
        await hosts.create(replica_a, operator, HostSpec("agent"))
        await members.create(replica_a, operator, MemberSpec("ada@example.com", "Ada"))
        await identities.create(
            replica_a,
            vault,
            hasher,
            operator,
            server="bq",
            owner="ada@example.com",
            secret=bearer_secret("credential-abcdefgh"),
        )
        _c, token, secret = await connections.create(
            replica_a, hasher, operator, host="agent", gateway="analytics", member="ada@example.com"
        )
        resolver_b = Resolver(replica_b, hasher, cache_ttl_s=3600)  # only events can make B forget
        await resolver_b.resolve(secret)
        heard: list[Changed] = []
        arrived = anyio.Event()

        def on_change(event: Changed) -> None:
            heard.append(event)
            arrived.set()

        replica_b.bus.subscribe(on_change)
        listening = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pg_events.listen(pg_url, replica_b.bus, ready=listening))
            with anyio.fail_after(10):
                await listening.wait()
                await hosts.set_enabled(replica_a, operator, "agent", False)
                await arrived.wait()
            assert heard[0].subject is Subject.HOST
            with pytest.raises(HostDisabled):
                await resolver_b.resolve(secret)
            arrived = anyio.Event()
            with anyio.fail_after(10):
                await hosts.set_enabled(replica_a, operator, "agent", True)
                await arrived.wait()
            await resolver_b.resolve(secret)
            arrived = anyio.Event()
            with anyio.fail_after(10):
                await tokens.revoke(replica_a, operator, token.id)
                await arrived.wait()
            with pytest.raises(Unauthenticated, match="revoked"):
                await resolver_b.resolve(secret)
            tg.cancel_scope.cancel()
        resolver_b.close()
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_rolled_back_changes_are_never_announced(pg_url: str) -> None:
    from bastion.db.store import emit
    from bastion.events.bus import EventBus

    store = Store.from_url(pg_url)
    listener_bus_events: list[Changed] = []
    arrived = anyio.Event()

    def on_change(event: Changed) -> None:
        listener_bus_events.append(event)
        arrived.set()

    try:
        bus = EventBus()
        bus.subscribe(on_change)
        listening = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pg_events.listen(pg_url, bus, ready=listening))
            with anyio.fail_after(10):
                await listening.wait()
            with pytest.raises(RuntimeError):
                async with store.transaction() as conn:
                    emit(conn, Changed(Subject.HOST, "rolled-back"))
                    raise RuntimeError("abort")
            async with store.transaction() as conn:
                emit(conn, Changed(Subject.HOST, "committed"))
            with anyio.fail_after(10):
                await arrived.wait()
            tg.cancel_scope.cancel()
        assert [e.id for e in listener_bus_events] == ["committed"]
    finally:
        await store.close()


async def test_while_its_listener_is_cut_off_a_replica_keeps_nothing_in_its_caches(
    pg_url: str, hasher: KeyHasher, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that cannot hear changes (its listening connection was killed) reads every token afresh until the
    listener is back, so a change it never heard still holds."""
    import psycopg
    import sqlalchemy as sa

    from bastion.db import schema
    from bastion.services import workspace

    connect = psycopg.AsyncConnection.connect
    may_reconnect, connects = anyio.Event(), 0

    async def gated(*args: Any, **kwargs: Any) -> Any:
        nonlocal connects
        connects += 1
        if connects > 1:
            await may_reconnect.wait()  # the database stays out of reach until the test says otherwise
        return await connect(*args, **kwargs)

    store = Store.from_url(pg_url, audit=wiring.chain_keys_from(settings))
    try:
        operator = Actor.local_operator((await workspace.ensure_workspace(store)).id)
        bq = ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example/mcp")
        secret = await ada_connected(store, hasher, operator, bq, gateway="analytics")
        resolver = Resolver(store, hasher, cache_ttl_s=300)
        cut_off, back = anyio.Event(), anyio.Event()

        def on_change(event: Changed) -> None:
            if event.subject is Subject.ALL:
                (back if store.bus.live else cut_off).set()

        store.bus.subscribe(on_change)
        monkeypatch.setattr(psycopg.AsyncConnection, "connect", gated)
        listening = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pg_events.listen(pg_url, store.bus, ready=listening))
            with anyio.fail_after(10):
                await listening.wait()
            assert store.bus.live
            async with store.engine.begin() as conn:  # the listener's connection dies (a failover, a proxy restart)
                await conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query = 'LISTEN bastion_changes'"
                    )
                )
            with anyio.fail_after(10):
                await cut_off.wait()
            # Cut off: a look-up answers but keeps nothing, so a change it cannot hear (made here without any event)
            # holds for the next call all the same.
            assert not store.bus.live
            await resolver.resolve(secret)
            async with store.engine.begin() as conn:
                await conn.execute(schema.hosts.update().values(enabled=False))
            with pytest.raises(HostDisabled):
                await resolver.resolve(secret)
            # Back: it forgets everything once more and caches again.
            may_reconnect.set()
            with anyio.fail_after(10):
                await back.wait()
            assert store.bus.live
            tg.cancel_scope.cancel()
        resolver.close()
    finally:
        await store.close()
