"""Access tokens (`bst_…`): minted for a connection, shown once, stored as an HMAC digest; listed and revoked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit, token_lifetime_of
from bastion.domain import lifetimes
from bastion.domain import tokens as token_format
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.connections import AccessToken
from bastion.domain.ids import new_id
from bastion.domain.webhooks import EventType
from bastion.events.bus import Changed, Subject
from bastion.services import hosts, members, outbox
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import WorkspaceId

T = schema.access_tokens
C = schema.connections


def row_to_token(row: sa.Row[Any]) -> AccessToken:
    return AccessToken(
        id=row.id,
        workspace_id=WorkspaceId(row.workspace_id),
        connection_id=row.connection_id,
        last4=row.last4,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


async def mint(
    conn: AsyncConnection, hasher: KeyHasher, workspace_id: str, connection_id: str, expires_at: datetime | None
) -> tuple[AccessToken, str]:
    now = datetime.now(UTC)
    expires_at = lifetimes.expiry(now, expires_at, token_lifetime_of(conn))
    secret = token_format.mint(token_format.ACCESS_TOKEN_PREFIX)
    token_id = new_id()
    await conn.execute(
        T.insert().values(
            id=token_id,
            workspace_id=workspace_id,
            connection_id=connection_id,
            digest=hasher.digest(secret),
            last4=token_format.last4(secret),
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            last_used_at=None,
        )
    )
    return row_to_token(await crud.fetch_one(conn, T, T.c.id == token_id, what="token")), secret


async def list_page(
    store: Store,
    actor: Actor,
    *,
    member: str | None = None,
    host: str | None = None,
    every: bool = False,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[AccessToken]:
    """The actor's own tokens; anyone's (by member, by host, or all) with tokens.manage."""
    async with store.transaction() as conn:
        owned = sa.select(C.c.id).where(C.c.workspace_id == actor.workspace_id)
        if every or member is not None or host is not None:
            actor.require(Capability.TOKENS_MANAGE)
        if member is not None:
            owned = owned.where(C.c.member_id == (await members.find(conn, actor.workspace_id, member)).id)
        elif not every and host is None:
            owned = owned.where(C.c.member_id == actor.member_id)
        if host is not None:
            owned = owned.where(C.c.host_id == (await hosts.find(conn, actor.workspace_id, host)).id)
        found, next_cursor = await crud.page(
            conn,
            T,
            [T.c.workspace_id == actor.workspace_id, T.c.connection_id.in_(owned)],
            cursor=cursor,
            limit=limit,
        )
    return Page([row_to_token(r) for r in found], next_cursor)


async def revoke(store: Store, actor: Actor, token_id: str) -> AccessToken:
    """Revoke at once: the next request with it is refused, on every replica once the event arrives."""
    async with store.transaction() as conn:
        row = await crud.fetch_one(conn, T, T.c.workspace_id == actor.workspace_id, T.c.id == token_id, what="token")
        owner = (await conn.execute(sa.select(C.c.member_id).where(C.c.id == row.connection_id))).scalar_one()
        if owner != actor.member_id:
            actor.require(Capability.TOKENS_MANAGE)
        if row.revoked_at is None:
            await conn.execute(T.update().where(T.c.id == token_id).values(revoked_at=datetime.now(UTC)))
            emit(conn, Changed(Subject.TOKEN, token_id))
            await outbox.forget_token(conn, token_id)
            await outbox.connection_event(conn, EventType.TOKEN_REVOKED, row.connection_id, token_id=token_id)
            action(conn, actor, "token.revoked", f"token:{token_id}", {"connection": row.connection_id})
        return row_to_token(await crud.fetch_one(conn, T, T.c.id == token_id, what="token"))
