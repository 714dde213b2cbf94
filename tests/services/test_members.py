"""Members: the workspace always keeps an active owner, even when two owners are demoted at the same moment."""

from __future__ import annotations

import anyio
import pytest
import sqlalchemy as sa
from anyio.lowlevel import checkpoint

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import MEMBER_ROLE, OWNER_ROLE
from bastion.domain.specs import MemberSpec
from bastion.errors import Conflict
from bastion.services import members, roles, workspace

pytestmark = pytest.mark.anyio
M = schema.members


async def _waiting_on_locks(store: Store) -> int:
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with store.transaction() as conn:
        return int((await conn.execute(query)).scalar_one())


async def test_two_owners_demoted_at_once_leave_one_owner(pg_store: Store) -> None:
    store = pg_store
    operator = Actor.local_operator((await workspace.default_workspace(store)).id)
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada", OWNER_ROLE))
    bob = await members.create(store, operator, MemberSpec("bob@example.com", "Bob", OWNER_ROLE))
    outcomes: dict[str, str] = {}

    async def demote(member_id: str) -> None:
        try:
            await members.update(store, operator, member_id, {"role": MEMBER_ROLE})
        except Conflict:
            outcomes[member_id] = "refused"
        else:
            outcomes[member_id] = "demoted"

    with anyio.fail_after(10):
        # Hold both owner rows so each demotion gets as far as it can before either may finish: without a lock
        # taken before counting, both would count two owners here and both would then go through.
        async with store.engine.connect() as holder:
            await holder.begin()
            await holder.execute(sa.select(M.c.id).where(M.c.id.in_((ada.id, bob.id))).with_for_update())
            async with anyio.create_task_group() as tg:
                tg.start_soon(demote, ada.id)
                tg.start_soon(demote, bob.id)
                while await _waiting_on_locks(store) < 2:
                    await checkpoint()
                await holder.rollback()

    assert sorted(outcomes.values()) == ["demoted", "refused"]
    owner = (await roles.get(store, operator, OWNER_ROLE)).id
    async with store.transaction() as conn:
        owners = (await conn.execute(sa.select(M.c.email).where(M.c.role_id == owner))).scalars().all()
    assert len(owners) == 1 and owners[0] in {"ada@example.com", "bob@example.com"}


async def test_the_last_owner_can_be_neither_demoted_nor_disabled_nor_deleted(store: Store, operator: Actor) -> None:
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada", OWNER_ROLE))
    for changes in ({"role": MEMBER_ROLE}, {"status": "disabled"}):
        with pytest.raises(Conflict, match="last active owner"):
            await members.update(store, operator, ada.id, changes)
    with pytest.raises(Conflict, match="last active owner"):
        await members.delete(store, operator, ada.id)
    bob = await members.create(store, operator, MemberSpec("bob@example.com", "Bob", OWNER_ROLE))
    await members.update(store, operator, ada.id, {"role": MEMBER_ROLE})
    with pytest.raises(Conflict, match="last active owner"):
        await members.delete(store, operator, bob.id)
