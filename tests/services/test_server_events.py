"""What server and identity edits tell the running processes: only edits of how one is reached close sessions."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentityStatus, bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import MemberSpec, RoleSpec, ServerSpec
from bastion.events.bus import Changed, Subject
from bastion.services import identities, members, roles, servers
from bastion.services.apikeys import KeyHasher

pytestmark = pytest.mark.anyio


async def test_a_description_edit_refreshes_views_but_leaves_sessions_and_a_url_edit_closes_them(
    store: Store, operator: Actor
) -> None:
    server = await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url="https://a.example")
    )
    heard: list[Changed] = []
    store.bus.subscribe(heard.append)
    await servers.update(store, operator, "crm", {"description": "The CRM, as the sales team uses it"})
    await servers.update(store, operator, "crm", {"url": "https://b.example"})
    await servers.update(store, operator, "crm", {"description": "moved", "call_timeout_s": 30.0})
    assert heard == [
        Changed(Subject.SERVER_INFO, server.id),
        Changed(Subject.SERVER, server.id),
        Changed(Subject.SERVER, server.id),
    ]


async def test_identity_edits_close_its_sessions_only_when_what_it_presents_changes_or_it_stops(
    store: Store, operator: Actor, vault: Any, hasher: KeyHasher
) -> None:
    await servers.create(store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url="https://a.example"))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    identity = await identities.create(
        store, vault, hasher, operator, server="crm", owner="ada@example.com", secret=bearer_secret("token-one-abcd")
    )
    heard: list[Changed] = []
    store.bus.subscribe(heard.append)

    async def edit(**changes: Any) -> None:
        await identities.update(store, vault, hasher, operator, identity.id, **changes)

    await edit(label="Ada's CRM")  # a label
    await edit(secret=bearer_secret("token-one-abcd"))  # the same value pasted again
    await edit(secret=bearer_secret("token-two-abcd"))  # another value
    await edit(status=IdentityStatus.DISABLED)  # it stops serving
    await edit(status=IdentityStatus.ACTIVE)  # and serves again
    assert [event.subject for event in heard] == [
        Subject.IDENTITY_INFO,
        Subject.IDENTITY_INFO,
        Subject.IDENTITY,
        Subject.IDENTITY,
        Subject.IDENTITY_INFO,
    ]
    assert {event.id for event in heard} == {identity.id}


async def test_a_role_edit_makes_every_process_read_its_holders_again(store: Store, operator: Actor) -> None:
    await roles.create(store, operator, RoleSpec("analyst", "Reads", frozenset()))
    heard: list[Changed] = []
    store.bus.subscribe(heard.append)
    role = await roles.update(store, operator, "analyst", {"name": "analysts"})
    assert heard == [Changed(Subject.ROLE, role.id)]


async def test_a_member_who_can_no_longer_call_has_the_sessions_of_their_identities_closed(
    store: Store, operator: Actor, vault: Any, hasher: KeyHasher
) -> None:
    await servers.create(store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url="https://a.example"))
    for email in ("ada@example.com", "bob@example.com"):
        await members.create(store, operator, MemberSpec(email, email[:3]))
    own = {
        email: await identities.create(
            store, vault, hasher, operator, server="crm", owner=email, secret=bearer_secret(f"{email}-token-abcd")
        )
        for email in ("ada@example.com", "bob@example.com")
    }
    heard: list[Changed] = []
    store.bus.subscribe(heard.append)
    await members.update(store, operator, "ada@example.com", {"status": "disabled"})
    assert Changed(Subject.IDENTITY, own["ada@example.com"].id) in heard
    assert Changed(Subject.IDENTITY, own["bob@example.com"].id) not in heard  # only the member changed
    heard.clear()
    await members.delete(store, operator, "bob@example.com")
    assert Changed(Subject.IDENTITY, own["bob@example.com"].id) in heard
