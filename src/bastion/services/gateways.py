"""Gateways: a named set of servers behind one URL, with per-server identity scheme and provisioning."""

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
from bastion.domain.capabilities import Capability
from bastion.domain.ids import new_id
from bastion.domain.models import Gateway
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, apply_changes
from bastion.errors import NotFound
from bastion.events.bus import Changed, Subject
from bastion.services import servers as servers_service
from bastion.services.actions import action

T = schema.gateways
GS = schema.gateway_servers
_READ = (Capability.GATEWAYS_MANAGE, Capability.HOSTS_MANAGE, Capability.TOKENS_MANAGE, Capability.ADMIN_VIEW)


async def _load(conn: AsyncConnection, row: sa.Row[Any]) -> Gateway:
    entries = (await conn.execute(sa.select(GS).where(GS.c.gateway_id == row.id).order_by(GS.c.position))).all()
    return rows.gateway(row, tuple(rows.gateway_server(e) for e in entries))


async def find(conn: AsyncConnection, workspace_id: str, ref: str) -> Gateway:
    """A gateway by id or slug."""
    row = await crud.fetch_one(
        conn, T, T.c.workspace_id == workspace_id, sa.or_(T.c.id == ref, T.c.slug == ref), what="gateway", ref=ref
    )
    return await _load(conn, row)


async def spec_of(conn: AsyncConnection, gateway: Gateway) -> GatewaySpec:
    query = sa.select(schema.servers.c.id, schema.servers.c.name).where(
        schema.servers.c.id.in_([s.server_id for s in gateway.servers])
    )
    names: dict[str, str] = {row.id: row.name for row in await conn.execute(query)}
    entries = tuple(
        GatewayServerSpec(
            names[s.server_id],
            s.alias,
            s.identity_scheme,
            s.shared_identity_id,
            s.tools,
            s.prompts,
            s.resources,
            s.namespaced,
        )
        for s in gateway.servers
    )
    return GatewaySpec(gateway.slug, gateway.name, gateway.description, gateway.enabled, entries)


async def _write_servers(conn: AsyncConnection, workspace_id: str, gateway_id: str, spec: GatewaySpec) -> None:
    await conn.execute(GS.delete().where(GS.c.gateway_id == gateway_id))
    for position, entry in enumerate(spec.servers):
        try:
            server = await servers_service.find(conn, workspace_id, entry.server)
        except NotFound:
            raise NotFound(
                f"servers[{position}]: no server named {entry.server!r}", field=f"servers[{position}].server"
            ) from None
        await conn.execute(
            GS.insert().values(
                id=new_id(),
                workspace_id=workspace_id,
                gateway_id=gateway_id,
                server_id=server.id,
                position=position,
                alias=entry.alias,
                identity_scheme=entry.identity_scheme.value,
                shared_identity_id=entry.shared_identity_id,
                provisioning=rows.provisioning_to_json(entry.tools, entry.prompts, entry.resources),
                namespaced=entry.namespaced,
            )
        )


async def create(store: Store, actor: Actor, spec: GatewaySpec) -> Gateway:
    actor.require(Capability.GATEWAYS_MANAGE)
    spec = spec.validated()
    now = datetime.now(UTC)
    gateway_id = new_id()
    async with store.transaction() as conn:
        await crud.insert(
            conn,
            T,
            {
                "id": gateway_id,
                "workspace_id": actor.workspace_id,
                "slug": spec.slug,
                "name": spec.name,
                "description": spec.description,
                "enabled": spec.enabled,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            },
            what="gateway",
            unique_field="slug",
        )
        await _write_servers(conn, actor.workspace_id, gateway_id, spec)
        action(
            conn,
            actor,
            "gateway.created",
            f"gateway:{gateway_id}",
            {"slug": spec.slug, "servers": [entry.alias for entry in spec.servers]},
        )
        return await find(conn, actor.workspace_id, gateway_id)


async def get(store: Store, actor: Actor, ref: str) -> tuple[Gateway, GatewaySpec]:
    actor.require_any(*_READ)
    async with store.transaction() as conn:
        gateway = await find(conn, actor.workspace_id, ref)
        return gateway, await spec_of(conn, gateway)


async def list_page(
    store: Store, actor: Actor, *, cursor: str | None = None, limit: int | None = None
) -> Page[tuple[Gateway, GatewaySpec]]:
    actor.require_any(*_READ)
    async with store.transaction() as conn:
        found, next_cursor = await crud.page(
            conn, T, [T.c.workspace_id == actor.workspace_id], cursor=cursor, limit=limit
        )
        items: list[tuple[Gateway, GatewaySpec]] = []
        for row in found:
            gateway = await _load(conn, row)
            items.append((gateway, await spec_of(conn, gateway)))
    return Page(items, next_cursor)


async def update(
    store: Store, actor: Actor, ref: str, changes: Mapping[str, Any], expected_version: int | None = None
) -> tuple[Gateway, GatewaySpec]:
    """Apply changes; ``servers``, when given, replaces the whole list."""
    actor.require(Capability.GATEWAYS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        emit(conn, Changed(Subject.GATEWAY, current.id))
        spec = apply_changes(await spec_of(conn, current), changes).validated()
        await crud.update_versioned(
            conn,
            T,
            current.id,
            expected_version,
            {
                "slug": spec.slug,
                "name": spec.name,
                "description": spec.description,
                "enabled": spec.enabled,
                "updated_at": datetime.now(UTC),
            },
            what="gateway",
            unique_field="slug",
        )
        if "servers" in changes:
            await _write_servers(conn, actor.workspace_id, current.id, spec)
        action(
            conn, actor, "gateway.updated", f"gateway:{current.id}", {"slug": spec.slug, "fields": [*sorted(changes)]}
        )
        gateway = await find(conn, actor.workspace_id, current.id)
        return gateway, await spec_of(conn, gateway)


async def delete(store: Store, actor: Actor, ref: str) -> None:
    actor.require(Capability.GATEWAYS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        emit(conn, Changed(Subject.GATEWAY, current.id))
        await crud.delete(conn, T, current.id, what="gateway")
        action(conn, actor, "gateway.deleted", f"gateway:{current.id}", {"slug": current.slug})
