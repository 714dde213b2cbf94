"""Access tokens (`bst_…`): minted for a connection, shown once, stored as an HMAC digest; listed and revoked.

A token that expires is announced to its host once ahead of time (``token.expiring``), with a successor minted and
handed over as ``token.minted`` when the host takes tokens by webhook: an agent (the SDK uses the newest token) moves
to it without anyone copying a token. The old one works until it expires.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

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
from bastion.domain.models import MemberStatus
from bastion.domain.webhooks import EventType
from bastion.events.bus import Changed, Subject
from bastion.services import endpoints, hosts, members, outbox
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import JSONObject, WorkspaceId

logger = logging.getLogger("bastion.tokens")
T = schema.access_tokens
C = schema.connections
EXPIRING_AHEAD: Final = timedelta(days=7)  # at most: a quarter of the token's lifetime when that is shorter
_RENEWER: Final = "bastion (renewing tokens ahead of expiry)"


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


async def mint_for_host(
    conn: AsyncConnection,
    hasher: KeyHasher,
    actor: Actor,
    connection_id: str,
    expires_at: datetime | None,
    detail: JSONObject | None = None,
) -> tuple[AccessToken, str]:
    """Another token for a connection, handed to its host as token.minted and audited as ``actor``'s doing."""
    token, secret = await mint(conn, hasher, actor.workspace_id, connection_id, expires_at)
    await outbox.connection_event(
        conn, EventType.TOKEN_MINTED, connection_id, token_id=token.id, secret=secret, hasher=hasher
    )
    action(conn, actor, "token.minted", f"token:{token.id}", {"connection": connection_id, **(detail or {})})
    return token, secret


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
        # A token Bastion minted to succeed this one (token.expiring) goes with it: revoking cuts the agent off.
        chain, successor = [row], row.successor_id
        while successor is not None:
            following = await crud.fetch_one(conn, T, T.c.id == successor, what="token")
            chain.append(following)
            successor = following.successor_id
        for previous, revoked in zip([None, *chain], chain, strict=False):
            if revoked.revoked_at is not None:
                continue
            await conn.execute(T.update().where(T.c.id == revoked.id).values(revoked_at=datetime.now(UTC)))
            emit(conn, Changed(Subject.TOKEN, revoked.id))
            await outbox.forget_token(conn, revoked.id)
            await outbox.connection_event(conn, EventType.TOKEN_REVOKED, row.connection_id, token_id=revoked.id)
            detail: JSONObject = {"connection": row.connection_id}
            if previous is not None:
                detail["succeeds"] = previous.id
            action(conn, actor, "token.revoked", f"token:{revoked.id}", detail)
        return row_to_token(await crud.fetch_one(conn, T, T.c.id == token_id, what="token"))


def expiring_from(created_at: datetime, expires_at: datetime) -> datetime:
    """When a token minted at ``created_at`` and expiring at ``expires_at`` is announced as expiring.

    A quarter of its lifetime ahead (at most `EXPIRING_AHEAD`), so a successor minted then, with the same lifetime,
    is announced only after as long again: renewal never runs in a loop however short tokens live.
    """
    return expires_at - min(EXPIRING_AHEAD, (expires_at - created_at) / 4)


async def announce_expiring(store: Store, hasher: KeyHasher, *, now: datetime | None = None) -> int:
    """Announce every token now due (`expiring_from`) once, minting successors; returns how many were announced.

    Each token in a transaction of its own, claimed by a conditional update: replicas sweeping at once announce
    each token once, and a token revoked meanwhile is not. A successor is minted only for a token in use (used
    since it was minted: one nobody uses is left to expire) whose connection, member, host and gateway are all
    enabled and whose host has an endpoint taking ``token.minted``, with the same lifetime (within the workspace's
    longest). Revoking a token revokes its successors (`revoke`).
    """
    now = now or datetime.now(UTC)
    async with store.transaction() as conn:
        found = (
            await conn.execute(
                sa.select(T.c.id, T.c.created_at, T.c.expires_at).where(
                    T.c.expires_at.is_not(None),
                    T.c.expires_at > now,
                    T.c.expires_at <= now + EXPIRING_AHEAD,
                    T.c.revoked_at.is_(None),
                    T.c.expiry_noticed_at.is_(None),
                )
            )
        ).all()
    announced = 0
    for row in found:
        if expiring_from(row.created_at, row.expires_at) <= now:
            announced += await _announce(store, hasher, row.id, now)
    return announced


async def _announce(store: Store, hasher: KeyHasher, token_id: str, now: datetime) -> int:
    async with store.transaction() as conn:
        unclaimed = (T.c.expiry_noticed_at.is_(None), T.c.revoked_at.is_(None), T.c.expires_at > now)
        claimed = await conn.execute(T.update().where(T.c.id == token_id, *unclaimed).values(expiry_noticed_at=now))
        if not claimed.rowcount:
            return 0  # another replica announced it, or it was revoked meanwhile
        token = row_to_token(await crud.fetch_one(conn, T, T.c.id == token_id, what="token"))
        assert token.expires_at is not None  # noqa: S101  selected for it
        m, h, g = schema.members, schema.hosts, schema.gateways
        connection = (
            await conn.execute(
                sa.select(C.c.host_id, C.c.enabled, m.c.status, h.c.enabled.label("host_on"), g.c.enabled.label("on"))
                .join(m, m.c.id == C.c.member_id)
                .join(h, h.c.id == C.c.host_id)
                .join(g, g.c.id == C.c.gateway_id)
                .where(C.c.id == token.connection_id)
            )
        ).one()
        actor = Actor(token.workspace_id, None, frozenset(), _RENEWER)
        successor: AccessToken | None = None
        live = connection.enabled and connection.host_on and connection.on
        in_use = token.last_used_at is not None and live and connection.status == MemberStatus.ACTIVE.value
        if in_use and await endpoints.subscribed(conn, connection.host_id, EventType.TOKEN_MINTED):
            lifetime = token.expires_at - token.created_at
            # Asked within the workspace's longest lifetime, which `mint` would refuse to exceed.
            ask = datetime.now(UTC) + min(lifetime, token_lifetime_of(conn) or lifetime)
            successor, _secret = await mint_for_host(
                conn, hasher, actor, token.connection_id, ask, {"succeeds": token.id}
            )
            await conn.execute(T.update().where(T.c.id == token.id).values(successor_id=successor.id))
        await outbox.connection_event(
            conn,
            EventType.TOKEN_EXPIRING,
            token.connection_id,
            token_id=token.id,
            expires_at=token.expires_at,
            successor_token_id=successor.id if successor is not None else None,
        )
        noted: JSONObject = {
            "expires_at": token.expires_at.isoformat(),
            "successor": successor.id if successor else None,
        }
        action(conn, actor, "token.expiring", f"token:{token.id}", noted)
    logger.info("token expiring announced", extra={"token_id": token_id, "successor": successor is not None})
    return 1
