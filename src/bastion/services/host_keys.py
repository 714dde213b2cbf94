"""Host keys (`bsh_…`): a host's own credential, for what the host does itself (redeeming claim codes).

Shown once, stored as an HMAC digest like API keys and access tokens. Admins with ``hosts.manage`` or
``tokens.manage`` create and revoke them; a key works only while its host is enabled.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.store import Store, token_lifetime_of
from bastion.domain import lifetimes, naming, tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.ids import new_id
from bastion.domain.webhooks import HostCaller, HostKey
from bastion.errors import Forbidden, Unauthenticated
from bastion.services import hosts
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher

T = schema.host_keys
H = schema.hosts
MANAGE: Final = (Capability.HOSTS_MANAGE, Capability.TOKENS_MANAGE)
READ: Final = (*MANAGE, Capability.ADMIN_VIEW)


def row_to_key(row: sa.Row[Any]) -> HostKey:
    return HostKey(
        id=row.id,
        workspace_id=row.workspace_id,
        host_id=row.host_id,
        name=row.name,
        last4=row.last4,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


async def create(
    store: Store, hasher: KeyHasher, actor: Actor, host: str, *, name: str, expires_at: datetime | None = None
) -> tuple[HostKey, str]:
    """Mint a key for ``host``; the plaintext is returned once and never stored."""
    actor.require_any(*MANAGE)
    name = naming.display_name(name)
    now = datetime.now(UTC)
    secret = tokens.mint(tokens.HOST_KEY_PREFIX)
    key_id = new_id()
    async with store.transaction() as conn:
        expires_at = lifetimes.expiry(now, expires_at, token_lifetime_of(conn))
        target = await hosts.find(conn, actor.workspace_id, host)
        await conn.execute(
            T.insert().values(
                id=key_id,
                workspace_id=actor.workspace_id,
                host_id=target.id,
                name=name,
                digest=hasher.digest(secret),
                last4=tokens.last4(secret),
                created_by=actor.member_id,
                created_at=now,
                expires_at=expires_at,
                revoked_at=None,
                last_used_at=None,
            )
        )
        action(conn, actor, "host_key.created", f"host_key:{key_id}", {"host": target.id, "name": name})
        row = await crud.fetch_one(conn, T, T.c.id == key_id, what="host key")
    return row_to_key(row), secret


async def list_page(
    store: Store, actor: Actor, host: str, *, cursor: str | None = None, limit: int | None = None
) -> Page[HostKey]:
    actor.require_any(*READ)
    async with store.transaction() as conn:
        target = await hosts.find(conn, actor.workspace_id, host)
        found, next_cursor = await crud.page(
            conn, T, [T.c.workspace_id == actor.workspace_id, T.c.host_id == target.id], cursor=cursor, limit=limit
        )
    return Page([row_to_key(r) for r in found], next_cursor)


async def revoke(store: Store, actor: Actor, host: str, key_id: str) -> HostKey:
    """Revoke at once; the key stays listed, marked revoked."""
    actor.require_any(*MANAGE)
    async with store.transaction() as conn:
        target = await hosts.find(conn, actor.workspace_id, host)
        row = await crud.fetch_one(
            conn, T, T.c.workspace_id == actor.workspace_id, T.c.host_id == target.id, T.c.id == key_id, what="host key"
        )
        if row.revoked_at is None:
            await conn.execute(T.update().where(T.c.id == row.id).values(revoked_at=datetime.now(UTC)))
            action(conn, actor, "host_key.revoked", f"host_key:{row.id}", {"host": target.id, "name": row.name})
        return row_to_key(await crud.fetch_one(conn, T, T.c.id == row.id, what="host key"))


async def authenticate(store: Store, hasher: KeyHasher, presented: str) -> HostCaller:
    """The host behind a presented key, or Unauthenticated; Forbidden while the host is disabled."""
    if not tokens.well_formed(presented, tokens.HOST_KEY_PREFIX):
        raise Unauthenticated("send a host key as `Authorization: Bearer bsh_…`")
    digest = hasher.digest(presented)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        found = (
            await conn.execute(
                sa.select(T, H.c.name.label("host_name"), H.c.enabled.label("host_enabled"))
                .join(H, H.c.id == T.c.host_id)
                .where(T.c.digest == digest)
            )
        ).first()
        # The lookup is by digest; compare again in constant time so the match itself leaks no timing.
        if found is None or not hmac.compare_digest(found.digest, digest):
            raise Unauthenticated("the host key is not valid")
        key = row_to_key(found)
        if not key.live_at(now):
            raise Unauthenticated("the host key is revoked or expired")
        if not found.host_enabled:
            raise Forbidden("this host is disabled")
        if key.last_used_at is None or now - key.last_used_at >= tokens.LAST_USED_WRITE_INTERVAL:
            await conn.execute(T.update().where(T.c.id == key.id).values(last_used_at=now))
    return HostCaller(workspace_id=key.workspace_id, host_id=key.host_id, host_name=found.host_name, key_id=key.id)
