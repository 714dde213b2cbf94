"""Hosts: the agents and apps that call gateways. Disabling one deletes nothing."""

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
from bastion.domain.models import Host, HostKind
from bastion.domain.specs import HostSpec, apply_changes
from bastion.domain.webhooks import EventType
from bastion.errors import VersionMismatch
from bastion.events.bus import Changed, Subject
from bastion.services import endpoints, outbox
from bastion.services.actions import action

T = schema.hosts
_READ = (Capability.HOSTS_MANAGE, Capability.HOSTS_DISABLE_ENABLE, Capability.TOKENS_MANAGE, Capability.ADMIN_VIEW)


async def find(conn: AsyncConnection, workspace_id: str, ref: str) -> Host:
    """A host by id or name."""
    row = await crud.fetch_one(
        conn, T, T.c.workspace_id == workspace_id, sa.or_(T.c.id == ref, T.c.name == ref), what="host", ref=ref
    )
    return rows.host(row)


async def create(store: Store, actor: Actor, spec: HostSpec) -> Host:
    actor.require(Capability.HOSTS_MANAGE)
    spec = spec.validated()
    now = datetime.now(UTC)
    host_id = new_id()
    async with store.transaction() as conn:
        await crud.insert(
            conn,
            T,
            {
                "id": host_id,
                "workspace_id": actor.workspace_id,
                "name": spec.name,
                "description": spec.description,
                "kind": HostKind.TOKEN.value,
                "enabled": True,
                "webhook_url": spec.webhook_url,
                "disabled_at": None,
                "disabled_by": None,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            },
            what="host",
            unique_field="name",
        )
        # The host's webhook URL is its first webhook endpoint (see services/webhooks.py).
        await endpoints.sync_host_url(conn, actor.workspace_id, host_id, spec.webhook_url)
        action(conn, actor, "host.created", f"host:{host_id}", {"name": spec.name})
        return await find(conn, actor.workspace_id, host_id)


async def get(store: Store, actor: Actor, ref: str) -> Host:
    actor.require_any(*_READ)
    async with store.transaction() as conn:
        return await find(conn, actor.workspace_id, ref)


async def list_page(
    store: Store, actor: Actor, *, cursor: str | None = None, limit: int | None = None, enabled: bool | None = None
) -> Page[Host]:
    actor.require_any(*_READ)
    where = [T.c.workspace_id == actor.workspace_id]
    if enabled is not None:
        where.append(T.c.enabled == enabled)
    async with store.transaction() as conn:
        found, next_cursor = await crud.page(conn, T, where, cursor=cursor, limit=limit)
    return Page([rows.host(r) for r in found], next_cursor)


async def update(
    store: Store, actor: Actor, ref: str, changes: Mapping[str, Any], expected_version: int | None = None
) -> Host:
    actor.require(Capability.HOSTS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        emit(conn, Changed(Subject.HOST, current.id))
        spec = apply_changes(HostSpec(current.name, current.description, current.webhook_url), changes).validated()
        await crud.update_versioned(
            conn,
            T,
            current.id,
            expected_version,
            {
                "name": spec.name,
                "description": spec.description,
                "webhook_url": spec.webhook_url,
                "updated_at": datetime.now(UTC),
            },
            what="host",
        )
        if spec.webhook_url != current.webhook_url:
            await endpoints.sync_host_url(conn, actor.workspace_id, current.id, spec.webhook_url)
        action(conn, actor, "host.updated", f"host:{current.id}", {"name": spec.name, "fields": [*sorted(changes)]})
        return await find(conn, actor.workspace_id, current.id)


async def set_enabled(store: Store, actor: Actor, ref: str, enabled: bool, expected_version: int | None = None) -> Host:
    """Disable or re-enable a host. Its tokens stay; they stop (or resume) working at once."""
    actor.require(Capability.HOSTS_DISABLE_ENABLE)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        # A no-op still honours If-Match: the caller decided on a version that is no longer current.
        if expected_version is not None and expected_version != current.version:
            raise VersionMismatch(
                f"the host changed since you read it (version {current.version}, you sent {expected_version})"
            )
        emit(conn, Changed(Subject.HOST, current.id))
        if current.enabled != enabled:
            await crud.update_versioned(
                conn,
                T,
                current.id,
                expected_version,
                {
                    "enabled": enabled,
                    "disabled_at": None if enabled else now,
                    "disabled_by": None if enabled else actor.member_id,
                    "updated_at": now,
                },
                what="host",
            )
            await outbox.host_event(conn, EventType.HOST_ENABLED if enabled else EventType.HOST_DISABLED, current.id)
            name = "host.enabled" if enabled else "host.disabled"
            action(conn, actor, name, f"host:{current.id}", {"name": current.name})
        return await find(conn, actor.workspace_id, current.id)


async def delete(store: Store, actor: Actor, ref: str) -> None:
    actor.require(Capability.HOSTS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        emit(conn, Changed(Subject.HOST, current.id))
        await crud.delete(conn, T, current.id, what="host")
        action(conn, actor, "host.deleted", f"host:{current.id}", {"name": current.name})
