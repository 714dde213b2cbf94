"""Members: people in the workspace, each holding one role."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, rows, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit
from bastion.domain import naming
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE, Capability
from bastion.domain.ids import new_id
from bastion.domain.models import Member, MemberStatus, Role
from bastion.domain.specs import MemberSpec, apply_changes
from bastion.errors import Conflict, Forbidden, NotFound
from bastion.events.bus import Changed, Subject
from bastion.oauth.revocation import Outcome, Revoker
from bastion.services import outbox, roles
from bastion.services.actions import action
from bastion.types import JSONObject

T = schema.members


async def find(conn: AsyncConnection, workspace_id: str, ref: str) -> Member:
    """A member by id or email."""
    row = await crud.fetch_one(
        conn,
        T,
        T.c.workspace_id == workspace_id,
        sa.or_(T.c.id == ref, T.c.email == ref.strip().lower()),
        what="member",
        ref=ref,
    )
    return rows.member(row)


def check_can_manage(actor: Actor, role: Role) -> None:
    """Nobody edits, or hands out, a role more powerful than their own."""
    missing = role.capabilities - actor.capabilities
    if missing:
        raise Forbidden(
            f"you cannot manage members holding, or give out, the role {role.name!r}: "
            "it has capabilities you do not hold"
        )


async def _role_named(conn: AsyncConnection, workspace_id: str, ref: str) -> Role:
    """The role a request body names (by name or id): ValidationFailed for what cannot be one, NotFound (naming
    the field) for one that does not exist."""
    naming.slug(ref, field="role")
    try:
        return await roles.find(conn, workspace_id, ref)
    except NotFound:
        raise NotFound(f"no role named {ref!r}", field="role") from None


async def _active_owners(conn: AsyncConnection, workspace_id: str) -> int:
    """How many active owners there are, with their rows locked until the caller's transaction ends.

    Without the lock two owners demoting each other at once would both count two owners and leave none.
    PostgreSQL takes row locks (in id order, so two callers cannot deadlock) and re-checks the condition once
    a blocking transaction commits; SQLite ignores FOR UPDATE but serialises writers with BEGIN IMMEDIATE.
    """
    owner = await roles.find(conn, workspace_id, OWNER_ROLE)
    query = (
        sa.select(T.c.id)
        .where(T.c.workspace_id == workspace_id, T.c.role_id == owner.id, T.c.status == MemberStatus.ACTIVE.value)
        .order_by(T.c.id)
        .with_for_update()
    )
    return len((await conn.execute(query)).all())


async def create(store: Store, actor: Actor, spec: MemberSpec) -> Member:
    actor.require(Capability.MEMBERS_MANAGE)
    spec = spec.validated()
    now = datetime.now(UTC)
    member_id = new_id()
    async with store.transaction() as conn:
        role = await _role_named(conn, actor.workspace_id, spec.role)
        check_can_manage(actor, role)
        await crud.insert(
            conn,
            T,
            {
                "id": member_id,
                "workspace_id": actor.workspace_id,
                "email": spec.email,
                "name": spec.name,
                "status": spec.status.value,
                "role_id": role.id,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            },
            what="member",
            unique_field="email",
        )
        action(conn, actor, "member.created", f"member:{member_id}", {"email": spec.email, "role": role.name})
        return await find(conn, actor.workspace_id, member_id)


async def get(store: Store, actor: Actor, ref: str) -> Member:
    actor.require_any(Capability.MEMBERS_MANAGE, Capability.ADMIN_VIEW)
    async with store.transaction() as conn:
        return await find(conn, actor.workspace_id, ref)


async def get_self(store: Store, actor: Actor) -> tuple[Member, Role]:
    if actor.member_id is None:
        raise Forbidden("the local operator is not a member")
    async with store.transaction() as conn:
        member = await find(conn, actor.workspace_id, actor.member_id)
        return member, await roles.find(conn, actor.workspace_id, member.role_id)


async def list_page(
    store: Store,
    actor: Actor,
    *,
    cursor: str | None = None,
    limit: int | None = None,
    status: MemberStatus | None = None,
) -> Page[Member]:
    actor.require_any(Capability.MEMBERS_MANAGE, Capability.ADMIN_VIEW)
    where = [T.c.workspace_id == actor.workspace_id]
    if status is not None:
        where.append(T.c.status == status.value)
    async with store.transaction() as conn:
        found, next_cursor = await crud.page(conn, T, where, cursor=cursor, limit=limit)
    return Page([rows.member(r) for r in found], next_cursor)


async def update(
    store: Store, actor: Actor, ref: str, changes: Mapping[str, Any], expected_version: int | None = None
) -> Member:
    actor.require(Capability.MEMBERS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        emit(conn, Changed(Subject.MEMBER, current.id))
        current_role = await roles.find(conn, actor.workspace_id, current.role_id)
        check_can_manage(actor, current_role)
        spec = apply_changes(MemberSpec(current.email, current.name, current_role.name, current.status), changes)
        spec = spec.validated()
        new_role = await _role_named(conn, actor.workspace_id, spec.role)
        check_can_manage(actor, new_role)
        leaves_owners = (
            current_role.name == OWNER_ROLE
            and current.status is MemberStatus.ACTIVE
            and (new_role.name != OWNER_ROLE or spec.status is not MemberStatus.ACTIVE)
        )
        if leaves_owners and await _active_owners(conn, actor.workspace_id) <= 1:
            raise Conflict("this is the last active owner; make someone else owner first", field="role")
        await crud.update_versioned(
            conn,
            T,
            current.id,
            expected_version,
            {
                "email": spec.email,
                "name": spec.name,
                "status": spec.status.value,
                "role_id": new_role.id,
                "updated_at": datetime.now(UTC),
            },
            what="member",
            unique_field="email",
        )
        name = "member.updated"
        if spec.status is not MemberStatus.ACTIVE:
            await _close_their_sessions(conn, current.id)
        if spec.status is not current.status:
            name = "member.enabled" if spec.status is MemberStatus.ACTIVE else "member.disabled"
        detail: JSONObject = {"email": spec.email, "fields": [*sorted(changes)], "role": new_role.name}
        action(conn, actor, name, f"member:{current.id}", detail)
        return await find(conn, actor.workspace_id, current.id)


async def _check_deletable(conn: AsyncConnection, actor: Actor, current: Member) -> None:
    role = await roles.find(conn, actor.workspace_id, current.role_id)
    check_can_manage(actor, role)
    if (
        role.name == OWNER_ROLE
        and current.status is MemberStatus.ACTIVE
        and await _active_owners(conn, actor.workspace_id) <= 1
    ):
        raise Conflict("this is the last active owner; make someone else owner first")


async def _close_their_sessions(conn: AsyncConnection, member_id: str) -> None:
    """A member who can no longer call (disabled, deleted): every process closes the upstream sessions of their
    private identities (once the calls on them end) rather than leaving them open until idle."""
    owned = await conn.execute(sa.select(schema.identities.c.id).where(schema.identities.c.owner_id == member_id))
    for identity_id in owned.scalars():
        emit(conn, Changed(Subject.IDENTITY, identity_id))


async def delete(store: Store, actor: Actor, ref: str, *, revoker: Revoker | None = None) -> None:
    """Remove a member and, with them, their private identities.

    With a ``revoker``, their OAuth identities' tokens are revoked at the authorization servers first (RFC 7009),
    outside any transaction; the deletion then destroys the sealed rows whatever the servers answered.
    """
    actor.require(Capability.MEMBERS_MANAGE)
    outcomes: dict[str, Outcome] = {}
    if revoker is not None:
        async with store.transaction() as conn:
            current = await find(conn, actor.workspace_id, ref)
            await _check_deletable(conn, actor, current)  # refused deletions revoke nothing
            pending = await revoker.gather(conn, actor.workspace_id, schema.identities.c.owner_id == current.id)
        outcomes = await revoker.revoke(pending)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        emit(conn, Changed(Subject.MEMBER, current.id))
        await _check_deletable(conn, actor, current)
        # Their connections go with them: each host hears their tokens revoked, as when a connection is deleted.
        await outbox.announce_revoked(conn, schema.connections.c.member_id == current.id)
        await _close_their_sessions(conn, current.id)
        await crud.delete(conn, T, current.id, what="member")
        detail: JSONObject = {"email": current.email}
        if outcomes:
            detail["identities_revoked"] = sum(o is Outcome.REVOKED for o in outcomes.values())
        action(conn, actor, "member.deleted", f"member:{current.id}", detail)
