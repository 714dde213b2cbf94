"""What a server edit tells the running processes: only edits of how it is reached close its upstream sessions."""

from __future__ import annotations

import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import ServerSpec
from bastion.events.bus import Changed, Subject
from bastion.services import servers

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
