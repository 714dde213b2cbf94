"""The workspace and its built-in roles: created once, found on every start."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import rows, schema
from bastion.db.store import Store
from bastion.domain.capabilities import BUILTIN_ROLES
from bastion.domain.ids import new_id
from bastion.domain.models import Workspace
from bastion.errors import NotFound


async def ensure_workspace(store: Store, name: str = "Default") -> Workspace:
    """The install's workspace with its built-in roles, created on first call (idempotent)."""
    async with store.transaction() as conn:
        existing = (await conn.execute(sa.select(schema.workspaces).order_by(schema.workspaces.c.id).limit(1))).first()
        if existing is not None:
            await _ensure_builtin_roles(conn, existing.id)
            return rows.workspace(existing)
        now = datetime.now(UTC)
        workspace_id = new_id()
        await conn.execute(
            schema.workspaces.insert().values(id=workspace_id, name=name, created_at=now, seals_bound_at=now)
        )
        await _ensure_builtin_roles(conn, workspace_id)
        return Workspace(id=rows.WorkspaceId(workspace_id), name=name, created_at=now)


async def _ensure_builtin_roles(conn: AsyncConnection, workspace_id: str) -> None:
    have = set(
        (await conn.execute(sa.select(schema.roles.c.name).where(schema.roles.c.workspace_id == workspace_id)))
        .scalars()
        .all()
    )
    now = datetime.now(UTC)
    for name, (description, capabilities) in BUILTIN_ROLES.items():
        if name in have:
            continue
        await conn.execute(
            schema.roles.insert().values(
                id=new_id(),
                workspace_id=workspace_id,
                name=name,
                description=description,
                capabilities=sorted(c.value for c in capabilities),
                builtin=True,
                version=1,
                created_at=now,
                updated_at=now,
            )
        )


async def default_workspace(store: Store) -> Workspace:
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(schema.workspaces).order_by(schema.workspaces.c.id).limit(1))).first()
    if row is None:
        raise NotFound("no workspace yet; run `bastion init`")
    return rows.workspace(row)
