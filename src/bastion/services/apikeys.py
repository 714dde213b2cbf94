"""Member API keys for the admin API: `bsk_…`, shown once, stored as an HMAC digest."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, rows, schema
from bastion.db.crud import Page
from bastion.db.store import Store
from bastion.domain import naming, tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.ids import new_id
from bastion.domain.models import ApiKey, MemberStatus
from bastion.errors import Forbidden, Unauthenticated, ValidationFailed
from bastion.services import members, roles
from bastion.services.actions import action
from bastion.types import MemberId

T = schema.api_keys
MAX_KEY_LIFETIME: Final = timedelta(days=3650)


class KeyHasher:
    """HMAC-SHA256 with the server-side pepper: a database leak is not a credential leak."""

    __slots__ = ("_pepper",)

    def __init__(self, pepper: bytes) -> None:
        self._pepper = pepper

    def __repr__(self) -> str:
        return "KeyHasher(<pepper hidden>)"

    def digest(self, token: str) -> bytes:
        return hmac.new(self._pepper, token.encode("utf-8"), hashlib.sha256).digest()


async def _owner_for(conn: AsyncConnection, actor: Actor, member: str | None) -> str:
    """Whose keys: the actor's own, or another member's with ``members.manage`` over a role no stronger than theirs.

    A key acts as its member, so reaching another member's keys is held to the same rule as managing them.
    """
    if member is None:
        if actor.member_id is None:
            raise ValidationFailed("name the member the key is for", field="member")
        return actor.member_id
    target = await members.find(conn, actor.workspace_id, member)
    if target.id != actor.member_id:
        actor.require(Capability.MEMBERS_MANAGE)
        members.check_can_manage(actor, await roles.find(conn, actor.workspace_id, target.role_id))
    return target.id


async def create(
    store: Store,
    hasher: KeyHasher,
    actor: Actor,
    *,
    name: str,
    member: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Mint a key; the plaintext is returned once and never stored. Others' keys: CLI or ``members.manage``."""
    name = naming.display_name(name)
    now = datetime.now(UTC)
    if expires_at is not None and not now < expires_at <= now + MAX_KEY_LIFETIME:
        raise ValidationFailed("expires_at must be in the future and within ten years", field="expires_at")
    secret = tokens.mint(tokens.API_KEY_PREFIX)
    key_id = new_id()
    async with store.transaction() as conn:
        owner = await _owner_for(conn, actor, member)
        await crud.insert(
            conn,
            T,
            {
                "id": key_id,
                "workspace_id": actor.workspace_id,
                "member_id": owner,
                "name": name,
                "digest": hasher.digest(secret),
                "last4": tokens.last4(secret),
                "created_at": now,
                "expires_at": expires_at,
                "revoked_at": None,
                "last_used_at": None,
            },
            what="API key",
            unique_field="id",
        )
        action(conn, actor, "apikey.created", f"apikey:{key_id}", {"name": name, "member": owner})
        row = await crud.fetch_one(conn, T, T.c.id == key_id, what="API key")
    return rows.api_key(row), secret


async def list_page(
    store: Store, actor: Actor, *, member: str | None = None, cursor: str | None = None, limit: int | None = None
) -> Page[ApiKey]:
    async with store.transaction() as conn:
        owner = await _owner_for(conn, actor, member)
        found, next_cursor = await crud.page(
            conn, T, [T.c.workspace_id == actor.workspace_id, T.c.member_id == owner], cursor=cursor, limit=limit
        )
    return Page([rows.api_key(r) for r in found], next_cursor)


async def revoke(store: Store, actor: Actor, key_id: str, *, member: str | None = None) -> ApiKey:
    """Revoke one of the actor's own keys, or one of ``member``'s; a key of anyone else is not found."""
    async with store.transaction() as conn:
        owner = await _owner_for(conn, actor, member)
        key = rows.api_key(
            await crud.fetch_one(
                conn,
                T,
                T.c.workspace_id == actor.workspace_id,
                T.c.member_id == owner,
                T.c.id == key_id,
                what="API key",
            )
        )
        if key.revoked_at is None:
            await conn.execute(T.update().where(T.c.id == key.id).values(revoked_at=datetime.now(UTC)))
            action(conn, actor, "apikey.revoked", f"apikey:{key.id}", {"name": key.name, "member": key.member_id})
        return rows.api_key(await crud.fetch_one(conn, T, T.c.id == key.id, what="API key"))


async def authenticate(store: Store, hasher: KeyHasher, presented: str) -> Actor:
    """The actor behind a presented key, or Unauthenticated. Malformed keys never reach the database."""
    if not tokens.well_formed(presented, tokens.API_KEY_PREFIX):
        raise Unauthenticated("the API key is malformed")
    digest = hasher.digest(presented)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(T).where(T.c.digest == digest))).first()
        # The lookup is by digest; compare again in constant time so the match itself leaks no timing.
        if row is None or not hmac.compare_digest(row.digest, digest):
            raise Unauthenticated("the API key is not valid")
        key = rows.api_key(row)
        if not key.live_at(now):
            raise Unauthenticated("the API key is revoked or expired")
        member = await members.find(conn, key.workspace_id, key.member_id)
        if member.status is not MemberStatus.ACTIVE:
            raise Forbidden("this member is disabled")
        role = await roles.find(conn, key.workspace_id, member.role_id)
        if key.last_used_at is None or now - key.last_used_at >= tokens.LAST_USED_WRITE_INTERVAL:
            await conn.execute(T.update().where(T.c.id == key.id).values(last_used_at=now))
    return Actor(
        workspace_id=key.workspace_id, member_id=MemberId(member.id), capabilities=role.capabilities, label=member.email
    )
