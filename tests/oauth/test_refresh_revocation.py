"""RFC 7009 revocation when an identity is deleted or its member leaves, then crypto-shredding (both engines)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.domain.specs import MemberSpec
from bastion.errors import Conflict
from bastion.net.outbound import OutboundPolicy
from bastion.oauth.model import ClientAuth
from bastion.oauth.revocation import Revoker
from bastion.services import identities, members
from bastion.services.apikeys import KeyHasher
from bastion.vault.sealer import Vault
from tests.fixtures.token_server import TokenServer
from tests.oauth.refresh_support import crm_with_token_server, oauth_identity

pytestmark = pytest.mark.anyio
RESOURCE = "https://crm.example.com/mcp"
T = schema.identities
E = schema.audit_events


@dataclass
class World:
    store: Store
    vault: Vault
    hasher: KeyHasher
    operator: Actor
    server: TokenServer
    issuer: str
    client_row: str
    revoker: Revoker

    async def identity(self, owner: str = "ada@example.com", *, revocation: bool = True) -> tuple[str, str, str]:
        access, refresh = self.server.grant(RESOURCE)
        identity = await oauth_identity(
            self.store,
            self.vault,
            self.hasher,
            self.operator,
            server="crm",
            owner=owner,
            issuer=self.issuer,
            client_row=self.client_row,
            access_token=access,
            refresh_token=refresh,
            expires_at=datetime.now(UTC) + timedelta(hours=1),
            resource=RESOURCE,
            revocation=revocation,
        )
        return identity.id, access, refresh

    async def rows(self, identity_id: str) -> int:
        async with self.store.engine.connect() as conn:
            return len((await conn.execute(sa.select(T.c.secret_sealed).where(T.c.id == identity_id))).all())

    async def event(self, method: str) -> Any:
        async with self.store.engine.connect() as conn:
            (row,) = (await conn.execute(sa.select(E).where(E.c.method == method))).all()
        return row


@pytest.fixture
async def world(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor) -> AsyncIterator[World]:
    async with crm_with_token_server(store, vault, operator, RESOURCE, ClientAuth.BASIC) as (server, url, row):
        revoker = Revoker(vault, OutboundPolicy(allow_loopback=True).client)
        yield World(store, vault, hasher, operator, server, url, row, revoker)


async def test_deleting_an_identity_revokes_its_refresh_token_first_then_shreds_it(world: World) -> None:
    identity_id, access, refresh = await world.identity()

    async def write_meanwhile() -> None:
        # A write while the revocation is in flight: it could not finish if the deletion held a transaction.
        world.server.during_revocation = None
        with anyio.fail_after(5):
            await members.create(world.store, world.operator, MemberSpec("bob@example.com", "Bob"))

    world.server.during_revocation = write_meanwhile
    await identities.delete(world.store, world.operator, identity_id, revoker=world.revoker)
    assert world.server.revoked == [(refresh, "refresh_token"), (access, "access_token")]
    assert {seen.client_id for seen in world.server.to("/revoke")} == {"bastion-client"}
    assert await world.rows(identity_id) == 0
    event = await world.event("identity.deleted")
    assert event.detail["revocation"] == "revoked"
    assert refresh not in str(event.detail)


async def test_deleting_works_with_a_warning_when_the_server_has_no_revocation_endpoint(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    identity_id, access, refresh = await world.identity(revocation=False)
    with caplog.at_level(logging.WARNING, logger="bastion.oauth"):
        await identities.delete(world.store, world.operator, identity_id, revoker=world.revoker)
    assert world.server.to("/revoke") == []
    assert await world.rows(identity_id) == 0
    assert (await world.event("identity.deleted")).detail["revocation"] == "unsupported"
    assert any("no revocation endpoint" in r.getMessage() for r in caplog.records)
    assert not any(access in r.getMessage() or refresh in r.getMessage() for r in caplog.records)


async def test_deleting_works_with_a_warning_when_revocation_fails(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.server.revocation = False  # the endpoint the metadata named answers 404
    identity_id, _access, refresh = await world.identity()
    with caplog.at_level(logging.WARNING, logger="bastion.oauth"):
        await identities.delete(world.store, world.operator, identity_id, revoker=world.revoker)
    assert await world.rows(identity_id) == 0
    assert (await world.event("identity.deleted")).detail["revocation"] == "failed"
    messages = [r.getMessage() + str(r.__dict__.get("error")) for r in caplog.records]
    assert any("revocation failed" in m for m in messages)
    assert not any(refresh in m for m in messages)


async def test_a_member_who_leaves_has_every_oauth_identity_revoked_then_shredded(world: World) -> None:
    first, _a1, refresh_1 = await world.identity()
    second, _a2, refresh_2 = await world.identity()
    await members.delete(world.store, world.operator, "ada@example.com", revoker=world.revoker)
    hinted = [token for token, hint in world.server.revoked if hint == "refresh_token"]
    assert sorted(hinted) == sorted([refresh_1, refresh_2])
    assert len(world.server.revoked) == 4
    assert await world.rows(first) == await world.rows(second) == 0
    assert (await world.event("member.deleted")).detail["identities_revoked"] == 2


async def test_a_refused_member_deletion_revokes_nothing(world: World) -> None:
    await members.create(world.store, world.operator, MemberSpec("owner@example.com", "Owner", OWNER_ROLE))
    identity_id, _access, _refresh = await world.identity("owner@example.com")
    with pytest.raises(Conflict):  # the last active owner stays
        await members.delete(world.store, world.operator, "owner@example.com", revoker=world.revoker)
    assert world.server.revoked == []
    assert await world.rows(identity_id) == 1


async def test_without_a_revoker_deletion_only_shreds(world: World) -> None:
    identity_id, _access, _refresh = await world.identity()
    await identities.delete(world.store, world.operator, identity_id)
    assert world.server.requests == []
    assert await world.rows(identity_id) == 0
