"""Admin and member actions: exactly one audit event per change, sealed with it, never for a failed change."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import importing
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE, Capability
from bastion.domain.identities import IdentityStatus, bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, RoleSpec, ServerSpec
from bastion.errors import Conflict, Forbidden, VersionMismatch
from bastion.services import (
    apikeys,
    connections,
    gateways,
    hosts,
    identities,
    links,
    members,
    roles,
    rotation,
    servers,
    tokens,
)
from bastion.services import importing as importing_service
from bastion.services.apikeys import KeyHasher
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault

pytestmark = pytest.mark.anyio
E = schema.audit_events
OPERATOR = "local operator"
CANARY_BEARER = "canary-pasted-bearer-7f3a9c1e5b2d"
CANARY_HEADER = "canary-header-value-4e8b2a6f0c1d"
CANARY_REPLACED = "canary-replacement-bearer-9d2c4b6a8e0f"
CANARY_ENV = "canary-env-secret-1a3c5e7b9d0f"


async def _admin_events(store: Store) -> list[sa.Row[Any]]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(sa.select(E).where(E.c.kind == "admin").order_by(E.c.seq))).all())


async def _count(store: Store) -> int:
    return len(await _admin_events(store))


def _summary(rows: list[sa.Row[Any]]) -> list[tuple[str, str, str, str | None]]:
    return [(r.method, r.target, r.actor, r.member_id) for r in rows]


class Keys:
    """Two vaults over one old key and a new one: before and after a rotation."""

    def __init__(self) -> None:
        old, new = os.urandom(32), os.urandom(32)
        self.before = Vault(Keyring({"old": old}, "old"))
        self.after = Vault(Keyring({"old": old, "new": new}, "new"))


async def test_each_change_records_one_event_in_order_with_its_actor_and_target(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    keys = Keys()
    role = await roles.create(
        store, operator, RoleSpec("oncall", capabilities=frozenset({Capability.HOSTS_DISABLE_ENABLE}))
    )
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada", "oncall"))
    key, key_secret = await apikeys.create(store, hasher, operator, name="laptop", member="ada@example.com")
    as_ada = await apikeys.authenticate(store, hasher, key_secret)  # marks the key used: bookkeeping, no event
    server = await servers.create(
        store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp")
    )
    gateway = await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    host = await hosts.create(store, operator, HostSpec("agent"))
    await hosts.set_enabled(store, as_ada, "agent", False)
    await hosts.set_enabled(store, as_ada, "agent", False)  # already disabled: nothing changes, nothing recorded
    await hosts.set_enabled(store, as_ada, "agent", True)
    identity = await identities.create(
        store, keys.before, hasher, operator, server="bq", owner="ada@example.com", secret=bearer_secret(CANARY_BEARER)
    )
    connection, first_token, _ = await connections.create(
        store, hasher, operator, host="agent", gateway="analytics", member="ada@example.com"
    )
    second_token, _ = await connections.mint_token(store, hasher, operator, connection.id)
    await tokens.revoke(store, operator, second_token.id)
    await tokens.revoke(store, operator, second_token.id)  # already revoked: nothing recorded
    link, link_secret = await links.create(store, hasher, operator, host="agent", gateway="analytics")
    async with store.transaction() as conn:
        await links.consume(conn, await links.find_by_secret(conn, hasher, link_secret), "bob@example.com")
    report = await importing_service.apply(
        store, operator, importing.parse('{"mcpServers": {"linear": {"url": "https://mcp.linear.app/mcp"}}}')
    )
    imported = report.created[0].id
    assert await rotation.rewrap(store, keys.after, operator) == 1
    await rotation.retire(store, keys.after, operator, "old")

    rows = await _admin_events(store)
    assert _summary(rows) == [
        ("role.created", f"role:{role.id}", OPERATOR, None),
        ("member.created", f"member:{ada.id}", OPERATOR, None),
        ("apikey.created", f"apikey:{key.id}", OPERATOR, None),
        ("server.created", f"server:{server.id}", OPERATOR, None),
        ("gateway.created", f"gateway:{gateway.id}", OPERATOR, None),
        ("host.created", f"host:{host.id}", OPERATOR, None),
        ("host.disabled", f"host:{host.id}", "ada@example.com", ada.id),
        ("host.enabled", f"host:{host.id}", "ada@example.com", ada.id),
        ("identity.created", f"identity:{identity.id}", OPERATOR, None),
        ("connection.created", f"connection:{connection.id}", OPERATOR, None),
        ("token.minted", f"token:{second_token.id}", OPERATOR, None),
        ("token.revoked", f"token:{second_token.id}", OPERATOR, None),
        ("link.created", f"link:{link.id}", OPERATOR, None),
        ("link.used", f"link:{link.id}", "bob@example.com", None),
        ("server.created", f"server:{imported}", OPERATOR, None),
        ("vault.rewrapped", "vault_key:new", OPERATOR, None),
        ("vault.retired", "vault_key:old", OPERATOR, None),
    ]
    assert [r.seq for r in rows] == list(range(rows[0].seq, rows[0].seq + len(rows)))
    assert {(r.workspace, r.outcome) for r in rows} == {(operator.workspace_id, "ok")}
    assert all(r.hash and r.prev_hash for r in rows), "every event is sealed into the chain"
    details = {r.method: r.detail for r in rows}
    assert details["role.created"] == {"name": "oncall", "capabilities": ["hosts.disable_enable"]}
    assert details["host.disabled"] == {"name": "agent"}
    assert details["connection.created"] == {
        "member": ada.id,
        "host": host.id,
        "gateway": gateway.id,
        "token": first_token.id,
        "link": None,
    }
    assert rows[14].detail == {"name": "linear", "transport": "streamable_http", "via": "import"}


async def test_updates_and_deletes_record_which_fields_changed(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault
) -> None:
    await roles.create(store, operator, RoleSpec("oncall"))
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp"))
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("agent"))
    identity = await identities.create(
        store, vault, hasher, operator, server="bq", owner=ada.id, secret=bearer_secret(CANARY_BEARER)
    )
    connection, _token, _ = await connections.create(
        store, hasher, operator, host="agent", gateway="analytics", member=ada.id
    )
    key, _ = await apikeys.create(store, hasher, operator, name="laptop", member=ada.id)
    link, _ = await links.create(store, hasher, operator, host="agent", gateway="analytics")
    start = await _count(store)

    await roles.update(store, operator, "oncall", {"description": "pager duty"})
    await members.update(store, operator, ada.id, {"status": "disabled"})
    await members.update(store, operator, ada.id, {"status": "active", "name": "Ada L."})
    await members.update(store, operator, ada.id, {"role": "oncall"})
    await servers.update(store, operator, "bq", {"description": "warehouse", "call_timeout_s": 30.0})
    await gateways.update(store, operator, "analytics", {"name": "Analytics", "servers": (GatewayServerSpec("bq"),)})
    await hosts.update(store, operator, "agent", {"description": "CI agent"})
    await connections.set_enabled(store, operator, connection.id, False)
    await connections.set_enabled(store, operator, connection.id, True)
    await identities.update(
        store,
        vault,
        hasher,
        operator,
        identity.id,
        status=IdentityStatus.DISABLED,
        secret=bearer_secret(CANARY_REPLACED),
    )
    await apikeys.revoke(store, operator, key.id, member=ada.id)
    await links.revoke(store, operator, link.id)
    await connections.delete(store, operator, connection.id)
    await identities.delete(store, operator, identity.id)
    await gateways.delete(store, operator, "analytics")
    await servers.delete(store, operator, "bq")
    await hosts.delete(store, operator, "agent")
    await members.delete(store, operator, ada.id)
    await roles.delete(store, operator, "oncall")

    rows = (await _admin_events(store))[start:]
    assert [(r.method, r.detail.get("fields")) for r in rows] == [
        ("role.updated", ["description"]),
        ("member.disabled", ["status"]),
        ("member.enabled", ["name", "status"]),
        ("member.updated", ["role"]),
        ("server.updated", ["call_timeout_s", "description"]),
        ("gateway.updated", ["name", "servers"]),
        ("host.updated", ["description"]),
        ("connection.disabled", None),
        ("connection.enabled", None),
        ("identity.updated", ["secret", "status"]),
        ("apikey.revoked", None),
        ("link.revoked", None),
        ("connection.deleted", None),
        ("identity.deleted", None),
        ("gateway.deleted", None),
        ("server.deleted", None),
        ("host.deleted", None),
        ("member.deleted", None),
        ("role.deleted", None),
    ]
    assert rows[9].detail == {"server": identity.server_id, "fields": ["secret", "status"], "status": "disabled"}


async def test_a_refused_or_failed_change_records_nothing(store: Store, hasher: KeyHasher, operator: Actor) -> None:
    await roles.create(store, operator, RoleSpec("oncall"))
    owner = await members.create(store, operator, MemberSpec("owner@example.com", "Owner", OWNER_ROLE))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada", "oncall"))
    _key, secret = await apikeys.create(store, hasher, operator, name="laptop", member="ada@example.com")
    as_ada = await apikeys.authenticate(store, hasher, secret)
    host = await hosts.create(store, operator, HostSpec("agent"))
    before = await _admin_events(store)

    with pytest.raises(Conflict):
        await roles.create(store, operator, RoleSpec("oncall"))  # the insert itself fails
    with pytest.raises(Conflict):
        await roles.delete(store, operator, "oncall")  # still held: the delete fails inside the transaction
    with pytest.raises(Conflict):
        await hosts.create(store, operator, HostSpec("agent"))
    with pytest.raises(Forbidden):
        await hosts.create(store, as_ada, HostSpec("other"))
    with pytest.raises(Conflict, match="last active owner"):
        await members.update(store, operator, owner.id, {"status": "disabled"})
    with pytest.raises(VersionMismatch):
        await hosts.update(store, operator, "agent", {"description": "stale"}, expected_version=host.version + 1)

    assert _summary(await _admin_events(store)) == _summary(before)


async def test_no_secret_reaches_the_audit_log(store: Store, hasher: KeyHasher, operator: Actor, vault: Vault) -> None:
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    _key, key_secret = await apikeys.create(store, hasher, operator, name="laptop", member=ada.id)
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp"))
    await servers.create(
        store, operator, ServerSpec("local", Transport.STDIO, command="run", env={"API_KEY": CANARY_ENV})
    )
    await servers.update(store, operator, "local", {"env": {"API_KEY": CANARY_ENV + "-2"}})
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("agent"))
    identity = await identities.create(
        store, vault, hasher, operator, server="bq", owner=ada.id, secret=bearer_secret(f"Bearer {CANARY_BEARER}")
    )
    await identities.create(
        store,
        vault,
        hasher,
        operator,
        server="bq",
        shared=True,
        secret=bearer_secret(headers={"X-Api-Key": CANARY_HEADER}),
    )
    await identities.update(store, vault, hasher, operator, identity.id, secret=bearer_secret(CANARY_REPLACED))
    connection, _token, token_secret = await connections.create(
        store, hasher, operator, host="agent", gateway="analytics", member=ada.id, identity_choices={"bq": identity.id}
    )
    _second, second_secret = await connections.mint_token(store, hasher, operator, connection.id)
    _link, link_secret = await links.create(store, hasher, operator, host="agent", gateway="analytics")

    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(E).order_by(E.c.seq))).mappings().all()
    logged = "\n".join(json.dumps(dict(row), default=str) for row in rows)
    assert len(rows) == 13 and "identity.updated" in logged
    canaries = (
        CANARY_BEARER,
        CANARY_HEADER,
        CANARY_REPLACED,
        CANARY_ENV,
        key_secret,
        token_secret,
        second_secret,
        link_secret,
    )
    assert [c for c in canaries if c in logged] == []


async def test_an_event_queued_by_a_transaction_that_rolls_back_is_never_sealed(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp"))
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("agent"))
    _link, link_secret = await links.create(store, hasher, operator, host="agent", gateway="analytics")

    class EnrollmentFailed(Exception):
        pass

    with pytest.raises(EnrollmentFailed):
        async with store.transaction() as conn:
            await links.consume(conn, await links.find_by_secret(conn, hasher, link_secret), "bob@example.com")
            raise EnrollmentFailed  # what comes after the use fails: the use is rolled back, and so is its event
    for n in range(3):  # whichever pooled connection held the queued event, one of these reuses it
        await hosts.create(store, operator, HostSpec(f"host-{n}"))

    assert "link.used" not in [r.method for r in await _admin_events(store)]
