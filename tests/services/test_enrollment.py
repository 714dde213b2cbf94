"""Enrollment drafts: a pasted token is sealed under its future identity's id, survives key rotation, and opens after
approval; approval is all or nothing."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.specs import MemberSpec
from bastion.errors import Gone
from bastion.services import enrollment, identities, members, rotation, sessions
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import Lifetimes, SignedIn
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault
from tests.web.ui.world import build_world, new_link

pytestmark = pytest.mark.anyio


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
