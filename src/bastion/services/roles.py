"""Roles: sets of capabilities. The owner role is locked; no one grants what they do not hold."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, rows, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit
from bastion.domain.actor import Actor
from bastion.domain.capabilities import BUILTIN_ROLES, LOCKED_ROLES, Capability
from bastion.domain.ids import new_id
from bastion.domain.models import Role
from bastion.domain.specs import RoleSpec, apply_changes
from bastion.errors import Conflict, Forbidden
from bastion.events.bus import Changed, Subject
from bastion.services.actions import action

T = schema.roles


def _check_grantable(actor: Actor, capabilities: frozenset[Capability]) -> None:
    missing = capabilities - actor.capabilities
    if missing:
        names = ", ".join(sorted(c.value for c in missing))
        raise Forbidden(f"you cannot grant capabilities you do not hold: {names}")


async def find(conn: AsyncConnection, workspace_id: str, ref: str) -> Role:
    """A role by id or by name."""
    row = await crud.fetch_one(
        conn, T, T.c.workspace_id == workspace_id, sa.or_(T.c.id == ref, T.c.name == ref), what="role", ref=ref
    )
    return rows.role(row)


async def create(store: Store, actor: Actor, spec: RoleSpec) -> Role:
    actor.require(Capability.ROLES_MANAGE)
    spec = spec.validated()
    _check_grantable(actor, spec.capabilities)
    if spec.name in BUILTIN_ROLES:
        raise Conflict(f"{spec.name!r} is a built-in role name", field="name")
    now = datetime.now(UTC)
    role_id = new_id()
    async with store.transaction() as conn:
        await crud.insert(
            conn,
            T,
            {
                "id": role_id,
                "workspace_id": actor.workspace_id,
                "name": spec.name,
                "description": spec.description,
                "capabilities": sorted(c.value for c in spec.capabilities),
                "builtin": False,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            },
            what="role",
            unique_field="name",
        )
        action(
            conn,
            actor,
            "role.created",
            f"role:{role_id}",
            {"name": spec.name, "capabilities": [*sorted(c.value for c in spec.capabilities)]},
        )
        return await find(conn, actor.workspace_id, role_id)


async def get(store: Store, actor: Actor, ref: str) -> Role:
    actor.require_any(Capability.ROLES_MANAGE, Capability.MEMBERS_MANAGE, Capability.ADMIN_VIEW)
    async with store.transaction() as conn:
        return await find(conn, actor.workspace_id, ref)


async def list_page(store: Store, actor: Actor, *, cursor: str | None = None, limit: int | None = None) -> Page[Role]:
    actor.require_any(Capability.ROLES_MANAGE, Capability.MEMBERS_MANAGE, Capability.ADMIN_VIEW)
    async with store.transaction() as conn:
        found, next_cursor = await crud.page(
            conn, T, [T.c.workspace_id == actor.workspace_id], cursor=cursor, limit=limit
        )
    return Page([rows.role(r) for r in found], next_cursor)


async def update(
    store: Store, actor: Actor, ref: str, changes: Mapping[str, Any], expected_version: int | None = None
) -> Role:
    actor.require(Capability.ROLES_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        if current.name in LOCKED_ROLES:
            raise Forbidden(f"the {current.name!r} role is built in and cannot be edited")
        spec = apply_changes(RoleSpec(current.name, current.description, current.capabilities), changes).validated()
        if current.builtin and spec.name != current.name:
            raise Conflict("built-in roles keep their names", field="name")
        if not current.builtin and spec.name in BUILTIN_ROLES:
            raise Conflict(f"{spec.name!r} is a built-in role name", field="name")
        # Editing a role changes what its holders can do: the editor must hold both the old and the new set.
        _check_grantable(actor, spec.capabilities | current.capabilities)
        await crud.update_versioned(
            conn,
            T,
            current.id,
            expected_version,
            {
                "name": spec.name,
                "description": spec.description,
                "capabilities": sorted(c.value for c in spec.capabilities),
                "updated_at": datetime.now(UTC),
            },
            what="role",
        )
        # Its holders' cached look-ups carry its name (policy rules may name it): every process reads them again.
        emit(conn, Changed(Subject.ROLE, current.id))
        action(
            conn,
            actor,
            "role.updated",
            f"role:{current.id}",
            {
                "name": spec.name,
                "fields": [*sorted(changes)],
                "capabilities": [*sorted(c.value for c in spec.capabilities)],
            },
        )
        return await find(conn, actor.workspace_id, current.id)


async def delete(store: Store, actor: Actor, ref: str) -> None:
    actor.require(Capability.ROLES_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        if current.builtin:
            raise Forbidden(f"the built-in {current.name!r} role cannot be deleted")
        _check_grantable(actor, current.capabilities)
        await crud.delete(conn, T, current.id, what="role", in_use="members still hold it; give them another role")
        action(conn, actor, "role.deleted", f"role:{current.id}", {"name": current.name})
