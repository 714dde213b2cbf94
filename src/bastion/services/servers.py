"""Upstream MCP servers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, rows, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit, outbound_of
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, Server, Transport
from bastion.domain.specs import ServerSpec, validated_change
from bastion.errors import Conflict
from bastion.events.bus import Changed, Subject
from bastion.net.outbound import OutboundPolicy, check_url_shape
from bastion.services.actions import action
from bastion.types import JSONObject

T = schema.servers


async def find(conn: AsyncConnection, workspace_id: str, ref: str) -> Server:
    """A server by id or name."""
    row = await crud.fetch_one(
        conn, T, T.c.workspace_id == workspace_id, sa.or_(T.c.id == ref, T.c.name == ref), what="server", ref=ref
    )
    return rows.server(row)


def spec_of(server: Server) -> ServerSpec:
    return ServerSpec(
        name=server.name,
        transport=server.transport,
        url=server.url,
        command=server.command,
        args=server.args,
        env=server.env,
        description=server.description,
        auth_kind=server.auth_kind,
        oauth=server.oauth,
        era=server.era,
        connect_timeout_s=server.connect_timeout_s,
        call_timeout_s=server.call_timeout_s,
        token_env=server.token_env,
    )


def _columns(spec: ServerSpec) -> dict[str, Any]:
    values = asdict(spec)
    values["transport"] = spec.transport.value
    values["auth_kind"] = spec.auth_kind.value
    values["era"] = spec.era.value
    values["args"] = list(spec.args)
    values["env"] = dict(spec.env)
    values["oauth"] = rows.oauth_to_json(spec.oauth)
    return values


def _checked(spec: ServerSpec, policy: OutboundPolicy | None) -> ServerSpec:
    """Refuse a URL the install's outbound policy refuses (its server URL, its OAuth authorization server), as a
    connection to it would; a hostname's addresses are still checked on every connection."""
    if spec.url is not None:
        check_url_shape(spec.url, field="url", policy=policy)
    if spec.oauth is not None and spec.oauth.authorization_server is not None:
        check_url_shape(spec.oauth.authorization_server, field="oauth.authorization_server", policy=policy)
    return spec


async def create(store: Store, actor: Actor, spec: ServerSpec, *, via: str | None = None) -> Server:
    """Add a server; ``via`` (e.g. "import") says in the audit event how it came."""
    actor.require(Capability.SERVERS_MANAGE)
    spec = _checked(spec.validated(), store.outbound() if store.outbound is not None else None)
    now = datetime.now(UTC)
    server_id = new_id()
    async with store.transaction() as conn:
        await crud.insert(
            conn,
            T,
            {
                "id": server_id,
                "workspace_id": actor.workspace_id,
                **_columns(spec),
                "version": 1,
                "created_at": now,
                "updated_at": now,
            },
            what="server",
            unique_field="name",
        )
        detail: JSONObject = {"name": spec.name, "transport": spec.transport.value}
        if via is not None:
            detail["via"] = via
        action(conn, actor, "server.created", f"server:{server_id}", detail)
        return await find(conn, actor.workspace_id, server_id)


async def get(store: Store, actor: Actor, ref: str) -> Server:
    actor.require_any(Capability.SERVERS_MANAGE, Capability.GATEWAYS_MANAGE, Capability.ADMIN_VIEW)
    async with store.transaction() as conn:
        return await find(conn, actor.workspace_id, ref)


async def list_page(
    store: Store,
    actor: Actor,
    *,
    cursor: str | None = None,
    limit: int | None = None,
    transport: Transport | None = None,
) -> Page[Server]:
    actor.require_any(Capability.SERVERS_MANAGE, Capability.GATEWAYS_MANAGE, Capability.ADMIN_VIEW)
    where = [T.c.workspace_id == actor.workspace_id]
    if transport is not None:
        where.append(T.c.transport == transport.value)
    async with store.transaction() as conn:
        found, next_cursor = await crud.page(conn, T, where, cursor=cursor, limit=limit)
    return Page([rows.server(r) for r in found], next_cursor)


def _with_transport(current: Server, changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` with what goes with them: leaving OAuth drops the OAuth settings, and moving to another
    transport clears the old transport's settings unless they are given (a stdio server has no url, an HTTP or
    SSE server no command, args or token_env)."""
    out = dict(changes)
    if "auth_kind" in changes and changes["auth_kind"] != AuthKind.OAUTH:
        out.setdefault("oauth", None)  # OAuth settings go with OAuth
    elif "auth_kind" not in changes and changes.get("oauth") is not None and current.auth_kind is not AuthKind.OAUTH:
        raise Conflict("the server does not use OAuth; set auth_kind to oauth in the same edit", field="oauth")
    transport = changes.get("transport")
    if changes.get("token_env") and "env" not in changes and changes["token_env"] in current.env:
        raise Conflict(f"{changes['token_env']} is a variable in the server's env; change env too", field="token_env")
    if transport is None:
        _fits_transport(current.transport, changes)
        return out
    if (transport == Transport.STDIO) == (current.transport is Transport.STDIO):
        return out  # the same kind of server: streamable HTTP and SSE both keep their url
    # Moving between stdio and HTTP: the old kind's settings go. A stdio server's command counts as part of the
    # change (missing, it is the request's own error, 422); a url the edit does not give conflicts (409).
    cleared: dict[str, Any] = (
        {"url": None, "command": None}
        if transport == Transport.STDIO
        else {"command": None, "args": (), "token_env": None}
    )
    return cleared | out


def _fits_transport(transport: Transport, changes: Mapping[str, Any]) -> None:
    """Settings of the other kind of server, given without changing the transport, conflict with the stored one."""
    if transport is Transport.STDIO:
        wrong = ["url"] if changes.get("url") is not None else []
        if "command" in changes and changes["command"] is None:
            raise Conflict("a stdio server needs its command; change its transport in the same edit", field="command")
        if changes.get("auth_kind") == AuthKind.OAUTH:
            raise Conflict("a stdio server takes bearer or no auth; change its transport too", field="auth_kind")
    else:
        wrong = [key for key in ("command", "args", "token_env") if changes.get(key)]
        if "url" in changes and changes["url"] is None:
            raise Conflict(
                f"a {transport.value} server needs its url; change its transport in the same edit", field="url"
            )
    if wrong:
        raise Conflict(
            f"a {transport.value} server has no {wrong[0]}; change its transport in the same edit", field=wrong[0]
        )


async def update(
    store: Store, actor: Actor, ref: str, changes: Mapping[str, Any], expected_version: int | None = None
) -> Server:
    actor.require(Capability.SERVERS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        spec = _checked(validated_change(spec_of(current), _with_transport(current, changes)), outbound_of(conn))
        # An edit of what only describes the server leaves its open upstream sessions (and calls on them) alone.
        reached_alike = replace(spec, description=current.description) == spec_of(current)
        emit(conn, Changed(Subject.SERVER_INFO if reached_alike else Subject.SERVER, current.id))
        await crud.update_versioned(
            conn, T, current.id, expected_version, {**_columns(spec), "updated_at": datetime.now(UTC)}, what="server"
        )
        # Field names only: ``env``, ``args`` and ``url`` can carry credentials.
        action(conn, actor, "server.updated", f"server:{current.id}", {"name": spec.name, "fields": [*sorted(changes)]})
        return await find(conn, actor.workspace_id, current.id)


async def _gateways_using(conn: AsyncConnection, server_id: str) -> list[str]:
    """The slugs of the gateways a server is in, sorted."""
    G, GS = schema.gateways, schema.gateway_servers
    query = sa.select(G.c.slug).join(GS, GS.c.gateway_id == G.c.id).where(GS.c.server_id == server_id)
    return sorted(set((await conn.execute(query)).scalars()))


async def delete(store: Store, actor: Actor, ref: str) -> None:
    actor.require(Capability.SERVERS_MANAGE)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, ref)
        users = await _gateways_using(conn, current.id)
        if users:
            plural = "s" if len(users) > 1 else ""
            raise Conflict(
                f"cannot delete server {current.name!r}: gateway{plural} {', '.join(map(repr, users))} use it; "
                "change their servers first (`bastion gateway update SLUG --server ...`) or delete them"
            )
        emit(conn, Changed(Subject.SERVER, current.id))
        await crud.delete(conn, T, current.id, what="server", in_use="a gateway still uses it; remove it there first")
        action(conn, actor, "server.deleted", f"server:{current.id}", {"name": current.name})
