"""Connection links: shareable enrollment URLs for a host + gateway. Stored as digests; revocable."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.store import Store
from bastion.domain import naming, tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.connections import ConnectionLink
from bastion.domain.ids import new_id
from bastion.errors import Conflict, NotFound, ValidationFailed
from bastion.services import gateways, hosts
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import GatewayId, HostId, JSONObject, MemberId, WorkspaceId

T = schema.connection_links
# Single use and three days unless the admin asks for more (an enrollment link is a credential to a connection).
DEFAULT_LINK_LIFETIME: Final = timedelta(hours=72)
# A link is shared with everyone who should connect; each enrollment is bound to the person who signs in.
DEFAULT_MAX_USES: Final[int | None] = None
MIN_LINK_LIFETIME: Final = timedelta(minutes=5)
MAX_LINK_LIFETIME: Final = timedelta(days=90)
MAX_ALLOWED_EMAILS: Final = 1000


def _row(row: sa.Row[Any]) -> ConnectionLink:
    return ConnectionLink(
        id=row.id,
        workspace_id=WorkspaceId(row.workspace_id),
        host_id=HostId(row.host_id),
        gateway_id=GatewayId(row.gateway_id),
        note=row.note,
        allowed_emails=frozenset(row.allowed_emails),
        max_uses=row.max_uses,
        uses=row.uses,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_by=MemberId(row.created_by) if row.created_by else None,
        created_at=row.created_at,
    )


async def create(
    store: Store,
    hasher: KeyHasher,
    actor: Actor,
    *,
    host: str,
    gateway: str,
    expires_in: timedelta = DEFAULT_LINK_LIFETIME,
    max_uses: int | None = DEFAULT_MAX_USES,
    allowed_emails: Iterable[str] = (),
    note: str = "",
) -> tuple[ConnectionLink, str]:
    """A new link; its secret (the last part of the URL) is returned once and stored only as a digest.

    By default any number of people may enroll through it within 72 hours, each as the person who signs in;
    ``max_uses`` caps how many, and longer lifetimes (up to 90 days) must be asked for.
    """
    actor.require(Capability.TOKENS_MANAGE)
    if not MIN_LINK_LIFETIME <= expires_in <= MAX_LINK_LIFETIME:
        raise ValidationFailed("a link lives between 5 minutes and 90 days", field="expires_in")
    if max_uses is not None and not 1 <= max_uses <= 1_000_000:
        raise ValidationFailed("max_uses must be between 1 and 1000000", field="max_uses")
    emails = sorted({naming.email(e, field="allowed_emails") for e in allowed_emails})
    if len(emails) > MAX_ALLOWED_EMAILS:
        raise ValidationFailed(f"at most {MAX_ALLOWED_EMAILS} allowed emails", field="allowed_emails")
    note = note.strip()
    if len(note) > 200:
        raise ValidationFailed("note must be at most 200 characters", field="note")
    secret = tokens.mint(tokens.LINK_PREFIX)
    link_id = new_id()
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        target_host = await hosts.find(conn, actor.workspace_id, host)
        target_gateway = await gateways.find(conn, actor.workspace_id, gateway)
        await conn.execute(
            T.insert().values(
                id=link_id,
                workspace_id=actor.workspace_id,
                host_id=target_host.id,
                gateway_id=target_gateway.id,
                digest=hasher.digest(secret),
                note=note,
                allowed_emails=emails,
                max_uses=max_uses,
                uses=0,
                expires_at=now + expires_in,
                revoked_at=None,
                created_by=actor.member_id,
                created_at=now,
            )
        )
        detail: JSONObject = {
            "host": target_host.id,
            "gateway": target_gateway.id,
            "max_uses": max_uses,
            "invited": len(emails),
            "expires_at": (now + expires_in).isoformat(),
        }
        action(conn, actor, "link.created", f"link:{link_id}", detail)
        return _row(await crud.fetch_one(conn, T, T.c.id == link_id, what="link")), secret


async def list_page(
    store: Store,
    actor: Actor,
    *,
    host: str | None = None,
    gateway: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[ConnectionLink]:
    actor.require(Capability.TOKENS_MANAGE)
    where: list[sa.ColumnElement[bool]] = [T.c.workspace_id == actor.workspace_id]
    async with store.transaction() as conn:
        if host is not None:
            where.append(T.c.host_id == (await hosts.find(conn, actor.workspace_id, host)).id)
        if gateway is not None:
            where.append(T.c.gateway_id == (await gateways.find(conn, actor.workspace_id, gateway)).id)
        found, next_cursor = await crud.page(conn, T, where, cursor=cursor, limit=limit)
    return Page([_row(r) for r in found], next_cursor)


async def revoke(store: Store, actor: Actor, link_id: str) -> ConnectionLink:
    actor.require(Capability.TOKENS_MANAGE)
    async with store.transaction() as conn:
        row = await crud.fetch_one(conn, T, T.c.workspace_id == actor.workspace_id, T.c.id == link_id, what="link")
        if row.revoked_at is None:
            await conn.execute(T.update().where(T.c.id == link_id).values(revoked_at=datetime.now(UTC)))
            action(conn, actor, "link.revoked", f"link:{link_id}", {"host": row.host_id, "gateway": row.gateway_id})
        return _row(await crud.fetch_one(conn, T, T.c.id == link_id, what="link"))


async def find(conn: AsyncConnection, workspace_id: str, link_id: str) -> ConnectionLink:
    """A link by id, in any state."""
    return _row(await crud.fetch_one(conn, T, T.c.workspace_id == workspace_id, T.c.id == link_id, what="link"))


async def find_by_secret(conn: AsyncConnection, hasher: KeyHasher, secret: str) -> ConnectionLink:
    """The link behind a URL secret, in any state; malformed secrets never reach the database."""
    if not tokens.well_formed(secret, tokens.LINK_PREFIX):
        raise NotFound("this connection link does not exist")
    row = (await conn.execute(sa.select(T).where(T.c.digest == hasher.digest(secret)))).first()
    if row is None:
        raise NotFound("this connection link does not exist")
    return _row(row)


async def consume(conn: AsyncConnection, link: ConnectionLink, email: str, actor: Actor | None = None) -> None:
    """Count one use of ``link`` for ``email``, atomically refusing revoked, expired, used-up or uninvited uses.

    Args:
        actor: who enrolls, once known; until then the event names them by ``email`` alone.
    """
    now = datetime.now(UTC)
    state = link.state_at(now)
    if state != "active":
        raise Conflict(f"this connection link is {state.replace('_', ' ')}")
    if not link.admits(email):
        raise Conflict("this connection link is for invited people only, and this account is not one of them")
    result = await conn.execute(
        T.update()
        .where(
            T.c.id == link.id,
            T.c.revoked_at.is_(None),
            T.c.expires_at > now,
            sa.or_(T.c.max_uses.is_(None), T.c.uses < T.c.max_uses),
        )
        .values(uses=T.c.uses + 1)
    )
    if result.rowcount != 1:
        raise Conflict("this connection link was used up or revoked a moment ago")
    by = actor or Actor(workspace_id=link.workspace_id, member_id=None, capabilities=frozenset(), label=email)
    action(conn, by, "link.used", f"link:{link.id}", {"email": email})
