"""Connections: a member enrolled at a gateway through a host, with an identity per per-user server and a token."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.connections import AccessToken, Connection
from bastion.domain.identities import IdentityStatus
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, IdentityScheme
from bastion.domain.webhooks import EventType
from bastion.errors import ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.services import gateways, hosts, identities, members, outbox, tokens
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import GatewayId, HostId, JSONObject, MemberId, WorkspaceId

T = schema.connections
CI = schema.connection_identities


async def _load(conn: AsyncConnection, row: sa.Row[Any]) -> Connection:
    mapping = dict(
        (await conn.execute(sa.select(CI.c.alias, CI.c.identity_id).where(CI.c.connection_id == row.id))).all()
    )
    return Connection(
        id=row.id,
        workspace_id=WorkspaceId(row.workspace_id),
        member_id=MemberId(row.member_id),
        host_id=HostId(row.host_id),
        gateway_id=GatewayId(row.gateway_id),
        link_id=row.link_id,
        enabled=row.enabled,
        identities=mapping,
        disabled_at=row.disabled_at,
        disabled_by=MemberId(row.disabled_by) if row.disabled_by else None,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def find(conn: AsyncConnection, workspace_id: str, connection_id: str) -> Connection:
    row = await crud.fetch_one(conn, T, T.c.workspace_id == workspace_id, T.c.id == connection_id, what="connection")
    return await _load(conn, row)


def _check_owner_or(actor: Actor, member_id: str, *capabilities: Capability) -> None:
    if member_id != actor.member_id:
        actor.require_any(*capabilities)


async def _resolve_identities(
    conn: AsyncConnection, actor: Actor, member_id: str, gateway_ref: str, chosen: Mapping[str, str]
) -> dict[str, str]:
    """Map every per-user server of the gateway to one of the member's own active identities for that server."""
    gateway = await gateways.find(conn, actor.workspace_id, gateway_ref)
    # Servers that take no credential need no identity, whatever their scheme.
    open_servers = set(
        (
            await conn.execute(
                sa.select(schema.servers.c.id).where(
                    schema.servers.c.id.in_([s.server_id for s in gateway.servers]),
                    schema.servers.c.auth_kind == AuthKind.NONE.value,
                )
            )
        ).scalars()
    )
    per_user = {s.alias: s for s in gateway.servers if s.identity_scheme is IdentityScheme.PER_USER}
    unknown = set(chosen) - set(per_user)
    if unknown:
        raise ValidationFailed(
            f"gateway {gateway.slug!r} has no per-user server {sorted(unknown)[0]!r}", field="identities"
        )
    out: dict[str, str] = {}
    ids_t = schema.identities
    for alias, entry in per_user.items():
        if alias in chosen:
            identity = await identities.find(conn, actor.workspace_id, chosen[alias])
            if identity.owner_id != member_id:
                raise ValidationFailed(f"identity for {alias!r} is not this member's own", field="identities")
            if identity.server_id != entry.server_id:
                raise ValidationFailed(f"identity for {alias!r} is for another server", field="identities")
            if identity.status is IdentityStatus.DISABLED:
                raise ValidationFailed(f"identity for {alias!r} is disabled", field="identities")
            out[alias] = identity.id
            continue
        candidates = (
            (
                await conn.execute(
                    sa.select(ids_t.c.id).where(
                        ids_t.c.workspace_id == actor.workspace_id,
                        ids_t.c.owner_id == member_id,
                        ids_t.c.server_id == entry.server_id,
                        ids_t.c.status != IdentityStatus.DISABLED.value,
                    )
                )
            )
            .scalars()
            .all()
        )
        if len(candidates) != 1 and entry.server_id in open_servers:
            continue  # a server that takes no credential needs no identity; one is used only if unambiguous
        if len(candidates) != 1:
            problem = "has no identity" if not candidates else "has several identities; choose one"
            raise ValidationFailed(f"the member {problem} for server {alias!r}", field=f"identities.{alias}")
        out[alias] = candidates[0]
    return out


async def create(
    store: Store,
    hasher: KeyHasher,
    actor: Actor,
    *,
    host: str,
    gateway: str,
    member: str | None = None,
    identity_choices: Mapping[str, str] | None = None,
    link_id: str | None = None,
    token_expires_at: datetime | None = None,
) -> tuple[Connection, AccessToken, str]:
    """Provision a connection and mint its token (returned once). For someone else it needs tokens.manage."""
    async with store.transaction() as conn:
        target = await members.find(conn, actor.workspace_id, member) if member else None
        member_id = target.id if target else actor.member_id
        if member_id is None:
            raise ValidationFailed("name the member this connection is for", field="member")
        return await provision(
            conn,
            hasher,
            actor,
            member_id=member_id,
            host=host,
            gateway=gateway,
            identity_choices=identity_choices,
            link_id=link_id,
            token_expires_at=token_expires_at,
        )


async def provision(
    conn: AsyncConnection,
    hasher: KeyHasher,
    actor: Actor,
    *,
    member_id: str,
    host: str,
    gateway: str,
    identity_choices: Mapping[str, str] | None = None,
    link_id: str | None = None,
    token_expires_at: datetime | None = None,
) -> tuple[Connection, AccessToken, str]:
    """``create`` inside the caller's transaction (enrollment approves identities, link and connection at once)."""
    now = datetime.now(UTC)
    connection_id = new_id()
    _check_owner_or(actor, member_id, Capability.TOKENS_MANAGE)
    target_host = await hosts.find(conn, actor.workspace_id, host)
    target_gateway = await gateways.find(conn, actor.workspace_id, gateway)
    mapping = await _resolve_identities(conn, actor, member_id, target_gateway.id, identity_choices or {})
    await conn.execute(
        T.insert().values(
            id=connection_id,
            workspace_id=actor.workspace_id,
            member_id=member_id,
            host_id=target_host.id,
            gateway_id=target_gateway.id,
            link_id=link_id,
            enabled=True,
            disabled_at=None,
            disabled_by=None,
            version=1,
            created_at=now,
            updated_at=now,
        )
    )
    for alias, identity_id in mapping.items():
        await conn.execute(
            CI.insert().values(
                id=new_id(),
                workspace_id=actor.workspace_id,
                connection_id=connection_id,
                alias=alias,
                identity_id=identity_id,
            )
        )
    token, secret = await tokens.mint(conn, hasher, actor.workspace_id, connection_id, token_expires_at)
    await outbox.connection_event(
        conn, EventType.CONNECTION_CREATED, connection_id, token_id=token.id, secret=secret, hasher=hasher
    )
    # One event for the whole enrollment: the first token is part of it (its id, never its value).
    detail: JSONObject = {
        "member": member_id,
        "host": target_host.id,
        "gateway": target_gateway.id,
        "token": token.id,
        "link": link_id,
    }
    action(conn, actor, "connection.created", f"connection:{connection_id}", detail)
    return await find(conn, actor.workspace_id, connection_id), token, secret


async def get(store: Store, actor: Actor, connection_id: str) -> Connection:
    async with store.transaction() as conn:
        found = await find(conn, actor.workspace_id, connection_id)
    _check_owner_or(actor, found.member_id, Capability.TOKENS_MANAGE, Capability.CONNECTIONS_DISABLE_ENABLE)
    return found


async def list_page(
    store: Store,
    actor: Actor,
    *,
    member: str | None = None,
    host: str | None = None,
    every: bool = False,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[Connection]:
    where: list[sa.ColumnElement[bool]] = [T.c.workspace_id == actor.workspace_id]
    async with store.transaction() as conn:
        if every or member is not None:
            actor.require_any(Capability.TOKENS_MANAGE, Capability.CONNECTIONS_DISABLE_ENABLE)
        if member is not None:
            where.append(T.c.member_id == (await members.find(conn, actor.workspace_id, member)).id)
        elif not every:
            where.append(T.c.member_id == actor.member_id)
        if host is not None:
            where.append(T.c.host_id == (await hosts.find(conn, actor.workspace_id, host)).id)
        found, next_cursor = await crud.page(conn, T, where, cursor=cursor, limit=limit)
        items = [await _load(conn, r) for r in found]
    return Page(items, next_cursor)


async def set_enabled(
    store: Store, actor: Actor, connection_id: str, enabled: bool, expected_version: int | None = None
) -> Connection:
    """Disable or re-enable; the token survives and works again once enabled."""
    actor.require(Capability.CONNECTIONS_DISABLE_ENABLE)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, connection_id)
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
                what="connection",
            )
            emit(conn, Changed(Subject.CONNECTION, current.id))
            event = EventType.CONNECTION_ENABLED if enabled else EventType.CONNECTION_DISABLED
            await outbox.connection_event(conn, event, current.id)
            name = "connection.enabled" if enabled else "connection.disabled"
            action(conn, actor, name, f"connection:{current.id}", {"member": current.member_id})
        return await find(conn, actor.workspace_id, current.id)


async def set_identity(store: Store, actor: Actor, connection_id: str, alias: str, identity_id: str) -> Connection:
    """Point one per-user server of the connection at another of the member's identities."""
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, connection_id)
        _check_owner_or(actor, current.member_id, Capability.TOKENS_MANAGE)
        mapping = await _resolve_identities(
            conn, actor, current.member_id, current.gateway_id, {**current.identities, alias: identity_id}
        )
        await conn.execute(CI.delete().where(CI.c.connection_id == current.id, CI.c.alias == alias))
        await conn.execute(
            CI.insert().values(
                id=new_id(),
                workspace_id=actor.workspace_id,
                connection_id=current.id,
                alias=alias,
                identity_id=mapping[alias],
            )
        )
        await conn.execute(
            T.update().where(T.c.id == current.id).values(version=T.c.version + 1, updated_at=datetime.now(UTC))
        )
        emit(conn, Changed(Subject.CONNECTION, current.id))
        detail: JSONObject = {
            "member": current.member_id,
            "fields": ["identities"],
            "alias": alias,
            "identity": mapping[alias],
        }
        action(conn, actor, "connection.updated", f"connection:{current.id}", detail)
        return await find(conn, actor.workspace_id, current.id)


async def mint_token(
    store: Store, hasher: KeyHasher, actor: Actor, connection_id: str, expires_at: datetime | None = None
) -> tuple[AccessToken, str]:
    """An additional token for an existing connection (e.g. to rotate: mint, switch the agent, revoke the old)."""
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, connection_id)
        _check_owner_or(actor, current.member_id, Capability.TOKENS_MANAGE)
        return await tokens.mint_for_host(conn, hasher, actor, current.id, expires_at)


async def delete(store: Store, actor: Actor, connection_id: str) -> None:
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, connection_id)
        _check_owner_or(actor, current.member_id, Capability.TOKENS_MANAGE)
        # Its tokens go with it: the host hears each one revoked (before the row its events count on is gone).
        await outbox.announce_revoked(conn, T.c.id == current.id)
        await crud.delete(conn, T, current.id, what="connection")
        emit(conn, Changed(Subject.CONNECTION, current.id))
        action(conn, actor, "connection.deleted", f"connection:{current.id}", {"member": current.member_id})
