"""Map 2: tokens resolve to the person, host, gateway and identities; disable/enable and revoke take effect at once."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.errors import Unauthenticated
from bastion.services import connections, gateways, hosts, identities, members, servers, tokens
from bastion.services.apikeys import KeyHasher
from bastion.services.principals import ConnectionDisabled, HostDisabled, MemberDisabled, Resolver

pytestmark = pytest.mark.anyio


async def _world(store: Store, vault: Any, hasher: KeyHasher, operator: Actor) -> dict[str, Any]:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp"))
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await gateways.create(store, operator, GatewaySpec("other", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("sales-agent"))
    await hosts.create(store, operator, HostSpec("other-agent"))
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    ident = await identities.create(
        store,
        vault,
        hasher,
        operator,
        server="bq",
        owner=ada.email,
        secret=bearer_secret("ada-upstream-credential-123"),
    )
    conn, token, secret = await connections.create(
        store, hasher, operator, host="sales-agent", gateway="analytics", member=ada.email
    )
    return {"ada": ada, "identity": ident, "connection": conn, "token": token, "secret": secret}


async def test_token_resolves_to_the_person_and_their_identity(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    world = await _world(store, vault, hasher, operator)
    resolver = Resolver(store, hasher)
    principal = await resolver.resolve(world["secret"], gateway="analytics")
    assert principal.member_email == "ada@example.com"
    assert principal.host_name == "sales-agent"
    assert principal.identities == {"bq": world["identity"].id}
    secret = await identities.open_secret(store, vault, principal.workspace_id, principal.identities["bq"])
    assert secret.outbound_headers() == {"Authorization": "Bearer ada-upstream-credential-123"}


async def test_token_is_refused_at_another_gateway_or_host(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    world = await _world(store, vault, hasher, operator)
    resolver = Resolver(store, hasher)
    with pytest.raises(Unauthenticated):
        await resolver.resolve(world["secret"], gateway="other")
    with pytest.raises(Unauthenticated):
        await resolver.resolve(world["secret"], host="other-agent")


async def test_disabled_host_blocks_tokens_and_enable_restores_them(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    world = await _world(store, vault, hasher, operator)
    resolver = Resolver(store, hasher)
    await resolver.resolve(world["secret"])  # cached now
    await hosts.set_enabled(store, operator, "sales-agent", False)
    with pytest.raises(HostDisabled):
        await resolver.resolve(world["secret"])
    page = await tokens.list_page(store, operator, every=True)
    assert [t.id for t in page.items] == [world["token"].id]
    await hosts.set_enabled(store, operator, "sales-agent", True)
    assert (await resolver.resolve(world["secret"])).token_id == world["token"].id


async def test_disabled_connection_and_member_block_tokens(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    world = await _world(store, vault, hasher, operator)
    resolver = Resolver(store, hasher)
    await resolver.resolve(world["secret"])
    await connections.set_enabled(store, operator, world["connection"].id, False)
    with pytest.raises(ConnectionDisabled):
        await resolver.resolve(world["secret"])
    await connections.set_enabled(store, operator, world["connection"].id, True)
    await members.update(store, operator, "ada@example.com", {"status": "disabled"})
    with pytest.raises(MemberDisabled):
        await resolver.resolve(world["secret"])
    await members.update(store, operator, "ada@example.com", {"status": "active"})
    assert (await resolver.resolve(world["secret"])).member_email == "ada@example.com"


async def test_revoked_token_fails_on_the_next_request(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    world = await _world(store, vault, hasher, operator)
    resolver = Resolver(store, hasher)
    await resolver.resolve(world["secret"])
    await tokens.revoke(store, operator, world["token"].id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await resolver.resolve(world["secret"])


def _mutations(token: str) -> list[str]:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
    out: set[str] = set()
    for i in range(len(token)):
        out.add(token[:i] + token[i + 1 :])
        for ch in alphabet[::7]:
            if ch != token[i]:
                out.add(token[:i] + ch + token[i + 1 :])
                out.add(token[:i] + ch + token[i:])
    out.discard(token)
    return sorted(out)


async def test_every_single_character_mutation_is_refused_without_a_database_query(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    from sqlalchemy import event

    world = await _world(store, vault, hasher, operator)
    resolver = Resolver(store, hasher)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    try:
        mutations = _mutations(world["secret"])
        assert len(mutations) > 500
        for mutated in mutations:
            with pytest.raises(Unauthenticated, match="malformed"):
                await resolver.resolve(mutated)
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", count)
    assert statements == []
