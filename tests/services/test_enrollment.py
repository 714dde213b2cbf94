"""Enrollment drafts: a pasted token is sealed under its future identity's id, survives key rotation, and opens after
approval; approval is all or nothing."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest
import sqlalchemy as sa
import time_machine

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentitySecret, bearer_secret
from bastion.domain.models import AuthKind
from bastion.domain.specs import MemberSpec
from bastion.errors import Gone
from bastion.net.outbound import OutboundPolicy
from bastion.oauth.model import ClientAuth
from bastion.oauth.revocation import Revoker
from bastion.services import enrollment, identities, janitor, members, rotation, servers, sessions
from bastion.services.apikeys import KeyHasher
from bastion.services.enrollment import AlreadyApproved
from bastion.services.sessions import Lifetimes, SignedIn
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault
from tests.fixtures.token_server import TokenServer
from tests.mcp_support import serving
from tests.oauth.refresh_support import oauth_client
from tests.web.ui.world import build_world, new_link

pytestmark = pytest.mark.anyio
RESOURCE: Final = "https://crm.example.com/mcp"


async def _signed_in(store: Store, hasher: KeyHasher, operator: Actor, email: str) -> SignedIn:
    member = await members.create(store, operator, MemberSpec(email, email.split("@")[0]))
    _session, secret = await sessions.start(
        store, hasher, member, method="password", user_agent="", lifetimes=Lifetimes()
    )
    found = await sessions.resolve(store, hasher, secret, Lifetimes())
    assert found is not None
    return found


async def test_a_drafted_token_survives_key_rotation_and_opens_as_the_identity_after_approval(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    before = Vault(Keyring({"old": old}, "old"))
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner)
    ada = await _signed_in(store, hasher, operator, "ada@example.com")
    draft = await enrollment.start(store, hasher, ada, secret)
    await enrollment.set_token(store, before, hasher, ada, draft.id, "crm", bearer_secret("ada-drafted-credential"))
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(schema.draft_identities))).one()
    assert row.id == row.identity_id and row.kek_id == "old"
    assert b"ada-drafted-credential" not in row.secret_sealed

    after = Vault(Keyring({"old": old, "new": new}, "new"))
    assert await rotation.rewrap(store, after, operator) >= 1
    assert await rotation.remaining(store, after) == 0
    await rotation.retire(store, after, operator, "old")

    enrolled = await enrollment.approve(store, hasher, ada, draft.id)
    identity_id = enrolled.connection.identities["crm"]
    assert identity_id == row.identity_id
    opened = await identities.open_secret(
        store, Vault(Keyring({"new": new}, "new")), ada.member.workspace_id, identity_id
    )
    assert opened.token == "ada-drafted-credential"


async def test_a_draft_sealed_before_0010_is_bound_to_its_enrolling_member_by_rebind(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner)
    ada = await _signed_in(store, hasher, operator, "ada@example.com")
    draft = await enrollment.start(store, hasher, ada, secret)
    await enrollment.set_token(store, vault, hasher, ada, draft.id, "crm", bearer_secret("ada-drafted-credential"))
    async with store.transaction() as conn:  # as 0010 finds a draft sealed by the release before
        row = (await conn.execute(sa.select(schema.draft_identities))).one()
        assert (row.owner_id, row.sealed_bound) == (ada.member.id, True)
        old = vault.seal(row.workspace_id, row.id, bearer_secret("ada-drafted-credential"))
        unbound = {"dek_wrapped": old.dek_wrapped, "secret_sealed": old.secret_sealed, "sealed_bound": False}
        await conn.execute(schema.draft_identities.update().values(owner_id=None, **unbound))
        await conn.execute(schema.workspaces.update().values(seals_bound_at=None))
    assert await rotation.rebind(store, vault, mark=True) == 1
    async with store.transaction() as conn:
        rebound = (await conn.execute(sa.select(schema.draft_identities))).one()
    assert (rebound.owner_id, rebound.sealed_bound) == (ada.member.id, True)
    enrolled = await enrollment.approve(store, hasher, ada, draft.id)
    identity_id = enrolled.connection.identities["crm"]
    opened = await identities.open_secret(store, vault, ada.member.workspace_id, identity_id)
    assert opened.token == "ada-drafted-credential"


async def test_an_approval_that_fails_leaves_the_draft_and_creates_nothing(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner, allowed=["ada@example.com"])
    ada = await _signed_in(store, hasher, operator, "ada@example.com")
    draft = await enrollment.start(store, hasher, ada, secret)
    await enrollment.set_token(store, vault, hasher, ada, draft.id, "crm", bearer_secret("ada-credential-1"))
    # The link is used up by someone else between drafting and approving (max_uses would do the same).
    async with store.transaction() as conn:
        await conn.execute(schema.connection_links.update().values(max_uses=1, uses=1))
    with pytest.raises(Gone, match="used as many times"):
        await enrollment.approve(store, hasher, ada, draft.id)
    async with store.transaction() as conn:
        for table in (schema.identities, schema.connections, schema.access_tokens):
            assert (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one() == 0
        assert (await conn.execute(sa.select(sa.func.count()).select_from(schema.draft_identities))).scalar_one() == 1


async def _count(store: Store, table: sa.Table) -> int:
    async with store.transaction() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_two_approvals_at_once_make_one_connection_and_the_second_is_told_it_was_approved(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    # No use limit: only the claim on the draft may stop the second approval.
    secret = await new_link(store, hasher, owner, max_uses=None)
    ada = await _signed_in(store, hasher, operator, "ada@example.com")
    draft = await enrollment.start(store, hasher, ada, secret)
    await enrollment.set_token(store, vault, hasher, ada, draft.id, "crm", bearer_secret("ada-credential-1"))

    outcomes = await asyncio.gather(
        enrollment.approve(store, hasher, ada, draft.id),
        enrollment.approve(store, hasher, ada, draft.id),
        return_exceptions=True,
    )
    enrolled = [o for o in outcomes if isinstance(o, enrollment.Enrolled)]
    refused = [o for o in outcomes if isinstance(o, AlreadyApproved)]
    assert (len(enrolled), len(refused)) == (1, 1), outcomes
    assert "already approved" in refused[0].detail
    for table, expected in (
        (schema.identities, 1),
        (schema.connections, 1),
        (schema.access_tokens, 1),
        (schema.draft_identities, 0),
    ):
        assert await _count(store, table) == expected, table.name
    async with store.transaction() as conn:
        assert (await conn.execute(sa.select(schema.connection_links.c.uses))).scalar_one() == 1
    # Later submits (another tab, the back button) are told the same, and a new start opens a fresh draft.
    with pytest.raises(AlreadyApproved):
        await enrollment.approve(store, hasher, ada, draft.id)
    with pytest.raises(AlreadyApproved):
        await enrollment.load(store, ada, draft.id)
    assert (await enrollment.start(store, hasher, ada, secret)).id != draft.id


# --- OAuth grants a draft lets go of are revoked (RFC 7009) ----------------------------------------------------------


@dataclass
class Grants:
    store: Store
    vault: Vault
    hasher: KeyHasher
    server: TokenServer
    revoker: Revoker
    ada: SignedIn
    link_secret: str
    details: dict[str, Any]

    async def draft_with_grant(self) -> tuple[str, str, str]:
        """A draft holding an OAuth grant for crm; (draft id, access token, refresh token)."""
        draft = await enrollment.start(self.store, self.hasher, self.ada, self.link_secret, revoker=self.revoker)
        access, refresh = await self.hold(draft.id)
        return draft.id, access, refresh

    async def hold(self, draft_id: str) -> tuple[str, str]:
        access, refresh = self.server.grant(RESOURCE)
        async with self.store.transaction() as conn:
            server_id = (await servers.find(conn, self.ada.member.workspace_id, "crm")).id
        await enrollment.set_oauth(
            self.store,
            self.vault,
            self.hasher,
            self.ada,
            draft_id,
            "crm",
            server_id=server_id,
            secret=IdentitySecret(access_token=access, refresh_token=refresh),
            details=self.details,
            label="crm (OAuth)",
            revoker=self.revoker,
        )
        return access, refresh


@pytest.fixture
async def grants(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor) -> AsyncIterator[Grants]:
    server = TokenServer()
    server.register("bastion-client", "client_secret_basic", "client-secret-value")
    owner = await build_world(store, operator, RESOURCE, AuthKind.OAUTH)
    link_secret = await new_link(store, hasher, owner, max_uses=None)
    ada = await _signed_in(store, hasher, operator, "ada@example.com")
    async with serving(server.app()) as url:
        row = await oauth_client(
            store,
            vault,
            operator,
            server="crm",
            issuer=url,
            client_id="bastion-client",
            auth_method=ClientAuth.BASIC,
            secret="client-secret-value",
        )
        details: dict[str, Any] = {
            "issuer": url,
            "token_endpoint": f"{url}/token",
            "revocation_endpoint": f"{url}/revoke",
            "oauth_client": row,
            "resource": RESOURCE,
            "scope": "tools",
        }
        revoker = Revoker(vault, OutboundPolicy(allow_loopback=True).client)
        yield Grants(store, vault, hasher, server, revoker, ada, link_secret, details)


@pytest.mark.parametrize(
    "how",
    [
        "cancelled",
        "cleared",
        "replaced_by_a_token",
        "replaced_by_oauth",
        "expired",
        "swept_by_the_janitor",
        "signed_out",
    ],
)
async def test_an_oauth_grant_a_draft_drops_is_revoked(grants: Grants, how: str) -> None:
    draft_id, access, refresh = await grants.draft_with_grant()
    assert grants.server.revoked == []
    kept: tuple[str, str] | None = None
    if how == "cancelled":
        await enrollment.cancel(grants.store, grants.ada, draft_id, revoker=grants.revoker)
    elif how == "cleared":
        await enrollment.clear(grants.store, grants.ada, draft_id, "crm", revoker=grants.revoker)
    elif how == "replaced_by_a_token":
        token = bearer_secret("a-pasted-token-instead")
        await enrollment.set_token(
            grants.store, grants.vault, grants.hasher, grants.ada, draft_id, "crm", token, revoker=grants.revoker
        )
    elif how == "replaced_by_oauth":
        kept = await grants.hold(draft_id)
    elif how == "signed_out":
        # The session ends; deleting it would take its drafts: the sweep before it revokes what they held.
        await sessions.end(grants.store, grants.ada)
        swept = await janitor.sweep(grants.store, Lifetimes(), grants.revoker)
        assert (swept.drafts, swept.sessions) == (1, 1)
    else:
        with time_machine.travel(datetime.now(UTC) + enrollment.DRAFT_LIFETIME + timedelta(minutes=1), tick=True):
            if how == "expired":
                assert await enrollment.sweep(grants.store, grants.revoker) == 1
            else:
                assert (await janitor.sweep(grants.store, Lifetimes(), grants.revoker)).drafts == 1
    assert grants.server.revoked == [(refresh, "refresh_token"), (access, "access_token")]
    assert {seen.client_id for seen in grants.server.to("/revoke")} == {"bastion-client"}
    if kept is not None:
        assert kept[1] in grants.server.refresh_tokens and kept[0] in grants.server.access_tokens


async def test_an_approved_grant_is_kept_and_a_failing_revocation_does_not_stop_a_cancel(
    grants: Grants, caplog: pytest.LogCaptureFixture
) -> None:
    draft_id, access, refresh = await grants.draft_with_grant()
    await enrollment.approve(grants.store, grants.hasher, grants.ada, draft_id, revoker=grants.revoker)
    assert grants.server.revoked == []
    assert refresh in grants.server.refresh_tokens and access in grants.server.access_tokens

    other = await enrollment.start(grants.store, grants.hasher, grants.ada, grants.link_secret, revoker=grants.revoker)
    await grants.hold(other.id)
    grants.server.revocation = False  # the endpoint answers 404 now
    with caplog.at_level(logging.WARNING, logger="bastion.oauth"):
        await enrollment.cancel(grants.store, grants.ada, other.id, revoker=grants.revoker)
    assert "token revocation failed" in caplog.text
    assert await _count(grants.store, schema.enrollment_drafts) == 1  # the approved one, until it expires
    assert await _count(grants.store, schema.draft_identities) == 0


async def test_reconnecting_revokes_the_grant_it_replaces(grants: Grants) -> None:
    draft_id, old_access, old_refresh = await grants.draft_with_grant()
    enrolled = await enrollment.approve(grants.store, grants.hasher, grants.ada, draft_id, revoker=grants.revoker)
    identity_id = enrolled.connection.identities["crm"]
    new_access, new_refresh = grants.server.grant(RESOURCE)
    async with grants.store.transaction() as conn:
        server_id = (await servers.find(conn, grants.ada.member.workspace_id, "crm")).id
    await enrollment.replace_secret(
        grants.store,
        grants.vault,
        grants.hasher,
        grants.ada,
        identity_id,
        server_id=server_id,
        secret=IdentitySecret(access_token=new_access, refresh_token=new_refresh),
        details=grants.details,
        revoker=grants.revoker,
    )
    assert grants.server.revoked == [(old_refresh, "refresh_token"), (old_access, "access_token")]
    assert new_refresh in grants.server.refresh_tokens and new_access in grants.server.access_tokens
    opened = await identities.open_secret(grants.store, grants.vault, grants.ada.member.workspace_id, identity_id)
    assert (opened.access_token, opened.refresh_token) == (new_access, new_refresh)

    # A server that hands the same refresh token out again: it is not revoked under the identity's feet.
    third_access, _unused = grants.server.grant(RESOURCE)
    await enrollment.replace_secret(
        grants.store,
        grants.vault,
        grants.hasher,
        grants.ada,
        identity_id,
        server_id=server_id,
        secret=IdentitySecret(access_token=third_access, refresh_token=new_refresh),
        details=grants.details,
        revoker=grants.revoker,
    )
    assert grants.server.revoked[2:] == [(new_access, "access_token")]
    assert new_refresh in grants.server.refresh_tokens
