"""Webhook endpoint rows and their signing secrets, inside a caller's transaction.

The admin use cases are in ``services/webhooks.py``; this module is what ``services/hosts.py`` (a host's
``webhook_url`` is its first endpoint), the outbox and the delivery worker share without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.store import outbound_of
from bastion.domain.identities import IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.webhooks import (
    SUBSCRIBABLE,
    Endpoint,
    EventType,
    SecretInfo,
    TokenDelivery,
    new_secret,
)
from bastion.net.outbound import check_url_shape
from bastion.services import vault_keys
from bastion.vault.sealer import Vault

E = schema.webhook_endpoints
S = schema.webhook_secrets
MAX_LIVE_SECRETS = 2


def _live(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(S.c.expires_at.is_(None), S.c.expires_at > now)


async def _secret_infos(conn: AsyncConnection, endpoint_id: str, now: datetime) -> tuple[SecretInfo, ...]:
    rows = await conn.execute(
        sa.select(S.c.id, S.c.created_at, S.c.expires_at)
        .where(S.c.endpoint_id == endpoint_id, _live(now))
        .order_by(S.c.created_at.desc(), S.c.id.desc())
    )
    return tuple(SecretInfo(r.id, r.created_at, r.expires_at) for r in rows)


def _types(raw: Any) -> tuple[EventType, ...]:
    values = cast("list[Any]", raw) if isinstance(raw, list) else []
    return tuple(t for t in SUBSCRIBABLE if t.value in values)


async def load(conn: AsyncConnection, row: sa.Row[Any]) -> Endpoint:
    return Endpoint(
        id=row.id,
        workspace_id=row.workspace_id,
        host_id=row.host_id,
        url=row.url,
        description=row.description,
        enabled=row.enabled,
        event_types=_types(row.event_types),
        token_delivery=TokenDelivery(row.token_delivery),
        from_host=row.from_host,
        secrets=await _secret_infos(conn, row.id, datetime.now(UTC)),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def find(conn: AsyncConnection, workspace_id: str, host_id: str, endpoint_id: str) -> Endpoint:
    row = await crud.fetch_one(
        conn,
        E,
        E.c.workspace_id == workspace_id,
        E.c.host_id == host_id,
        E.c.id == endpoint_id,
        what="endpoint",
        ref=endpoint_id,
    )
    return await load(conn, row)


async def insert(
    conn: AsyncConnection,
    workspace_id: str,
    host_id: str,
    *,
    url: str,
    description: str = "",
    enabled: bool = True,
    types: Sequence[EventType] = SUBSCRIBABLE,
    delivery: TokenDelivery = TokenDelivery.CLAIM_CODE,
    from_host: bool = False,
) -> str:
    """A new endpoint (without a secret yet); the URL must be one the outbound policy could ever allow."""
    now = datetime.now(UTC)
    endpoint_id = new_id()
    await conn.execute(
        E.insert().values(
            id=endpoint_id,
            workspace_id=workspace_id,
            host_id=host_id,
            url=check_url_shape(url, policy=outbound_of(conn)),
            description=description,
            enabled=enabled,
            event_types=[t.value for t in types],
            token_delivery=delivery.value,
            from_host=from_host,
            version=1,
            created_at=now,
            updated_at=now,
        )
    )
    return endpoint_id


async def sync_host_url(conn: AsyncConnection, workspace_id: str, host_id: str, url: str | None) -> None:
    """Keep the host's own endpoint in step with its ``webhook_url``: made, moved or removed with it.

    An endpoint made this way has no signing secret until an admin rotates one in (the secret is shown then);
    its events wait in the outbox meanwhile.
    """
    current = (await conn.execute(sa.select(E.c.id, E.c.url).where(E.c.host_id == host_id, E.c.from_host))).first()
    if url is None:
        if current is not None:
            await conn.execute(E.delete().where(E.c.id == current.id))
        return
    check_url_shape(url, field="webhook_url", policy=outbound_of(conn))
    if current is None:
        await insert(conn, workspace_id, host_id, url=url, from_host=True)
    elif current.url != url:
        await conn.execute(
            E.update()
            .where(E.c.id == current.id)
            .values(url=url, version=E.c.version + 1, updated_at=datetime.now(UTC))
        )


async def subscribed(conn: AsyncConnection, host_id: str, event_type: EventType) -> list[tuple[str, TokenDelivery]]:
    """(endpoint id, token delivery) of the host's enabled endpoints that take ``event_type``."""
    rows = await conn.execute(
        sa.select(E.c.id, E.c.event_types, E.c.token_delivery)
        .where(E.c.host_id == host_id, E.c.enabled)
        .order_by(E.c.id)
    )
    return [(r.id, TokenDelivery(r.token_delivery)) for r in rows if event_type in _types(r.event_types)]


async def live_secrets(conn: AsyncConnection, vault: Vault, endpoint_id: str, now: datetime) -> list[str]:
    """The endpoint's live secrets, opened, newest first (each attempt is signed with all of them)."""
    rows = await conn.execute(
        sa.select(S.c.id, S.c.workspace_id, S.c.dek_wrapped, S.c.secret_sealed)
        .where(S.c.endpoint_id == endpoint_id, _live(now))
        .order_by(S.c.created_at.desc(), S.c.id.desc())
    )
    out: list[str] = []
    for row in rows:
        opened = vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed).token
        if opened:
            out.append(opened)
    return out


async def add_secret(
    conn: AsyncConnection, vault: Vault, workspace_id: str, endpoint_id: str, overlap: timedelta
) -> str:
    """A new primary secret (returned once); the one it replaces keeps signing for ``overlap``, older ones stop."""
    now = datetime.now(UTC)
    await conn.execute(S.delete().where(S.c.endpoint_id == endpoint_id, S.c.expires_at <= now))
    await conn.execute(
        S.update().where(S.c.endpoint_id == endpoint_id, S.c.expires_at.is_(None)).values(expires_at=now + overlap)
    )
    secret = new_secret()
    secret_id = new_id()
    sealed = vault.seal(workspace_id, secret_id, IdentitySecret(token=secret))
    await vault_keys.record_seal(conn, sealed.kek_id)
    await conn.execute(
        S.insert().values(
            id=secret_id,
            workspace_id=workspace_id,
            endpoint_id=endpoint_id,
            kek_id=sealed.kek_id,
            dek_wrapped=sealed.dek_wrapped,
            secret_sealed=sealed.secret_sealed,
            created_at=now,
            expires_at=None,
        )
    )
    await _keep_newest(conn, endpoint_id, MAX_LIVE_SECRETS)
    return secret


async def retire_old(conn: AsyncConnection, endpoint_id: str) -> int:
    """Stop every secret but the newest at once (the rotation is complete); returns how many stopped."""
    return await _keep_newest(conn, endpoint_id, 1)


async def _keep_newest(conn: AsyncConnection, endpoint_id: str, keep: int) -> int:
    ids = (
        await conn.execute(
            sa.select(S.c.id).where(S.c.endpoint_id == endpoint_id).order_by(S.c.created_at.desc(), S.c.id.desc())
        )
    ).scalars()
    stale = list(ids)[keep:]
    if stale:
        await conn.execute(S.delete().where(S.c.id.in_(stale)))
    return len(stale)


def has_live_secret(now: datetime) -> sa.ColumnElement[bool]:
    """Rows of the outbox whose endpoint can sign: events for an endpoint without a secret wait."""
    return sa.exists(sa.select(S.c.id).where(S.c.endpoint_id == schema.webhook_outbox.c.endpoint_id, _live(now)))
