"""Claim codes (`bsc_…`): what a webhook event carries instead of a token, by default.

A code stands for one token and one host. Only its digest is stored; the token is sealed under the claim's row id
until the code is redeemed. Each delivery attempt that carries the code makes it good for ``CLAIM_CODE_LIFETIME``
from then, so an agent that was down when the token was minted can still claim it once the event arrives.
Redemption is single use, by the host the code was minted for only (any other caller learns nothing but
"not found"), and audited, whether it succeeds or is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.context import request_id_var
from bastion.db import schema
from bastion.db.audit import record
from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.audit import AuditEvent
from bastion.domain.identities import IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.webhooks import CLAIM_CODE_LIFETIME, HostCaller
from bastion.errors import NotFound
from bastion.services import vault_keys
from bastion.services.actions import action
from bastion.types import JSONObject, WorkspaceId
from bastion.vault.sealer import Vault

if TYPE_CHECKING:  # apikeys imports members, whose deletion writes to the outbox
    from bastion.services.apikeys import KeyHasher

C = schema.claim_codes
TOKENS = schema.access_tokens
CONNECTIONS = schema.connections
_NOT_FOUND = "no such claim code, or it was already used or has expired"


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a redeemed code gives its host. ``repr`` never shows the token."""

    token: str = field(repr=False)
    token_id: str
    connection_id: str
    member_id: str
    member_email: str
    gateway: str


async def mint(
    conn: AsyncConnection,
    vault: Vault,
    hasher: KeyHasher,
    *,
    workspace_id: str,
    host_id: str,
    token_id: str,
    token: str,
) -> tuple[str, str]:
    """A new code for ``token`` in the caller's transaction: (claim id, the code, to be sealed by the caller)."""
    now = datetime.now(UTC)
    code = tokens.mint(tokens.CLAIM_CODE_PREFIX)
    claim_id = new_id()
    sealed = vault.seal(workspace_id, claim_id, IdentitySecret(token=token))
    await vault_keys.record_seal(conn, sealed.kek_id)
    await conn.execute(
        C.insert().values(
            id=claim_id,
            workspace_id=workspace_id,
            host_id=host_id,
            token_id=token_id,
            digest=hasher.digest(code),
            kek_id=sealed.kek_id,
            dek_wrapped=sealed.dek_wrapped,
            secret_sealed=sealed.secret_sealed,
            created_at=now,
            expires_at=now + CLAIM_CODE_LIFETIME,
            redeemed_at=None,
        )
    )
    return claim_id, code


async def extend(conn: AsyncConnection, claim_id: str, now: datetime) -> datetime | None:
    """Make the code good for ``CLAIM_CODE_LIFETIME`` from this attempt; its expiry (None once gone or used)."""
    await conn.execute(
        C.update()
        .where(C.c.id == claim_id, C.c.redeemed_at.is_(None), C.c.expires_at < now + CLAIM_CODE_LIFETIME)
        .values(expires_at=now + CLAIM_CODE_LIFETIME)
    )
    found = (await conn.execute(sa.select(C.c.expires_at, C.c.redeemed_at).where(C.c.id == claim_id))).first()
    return found.expires_at if found is not None and found.redeemed_at is None else None


async def forget_token(conn: AsyncConnection, token_id: str) -> None:
    """A revoked token is never handed over: its unredeemed codes go (and with them the sealed token)."""
    await conn.execute(C.delete().where(C.c.token_id == token_id, C.c.redeemed_at.is_(None)))


def _host_actor(caller: HostCaller) -> Actor:
    return Actor(
        workspace_id=WorkspaceId(caller.workspace_id),
        member_id=None,
        capabilities=frozenset(),
        label=f"host:{caller.host_name}",
    )


async def redeem(store: Store, vault: Vault, hasher: KeyHasher, caller: HostCaller, code: str) -> Claimed:
    """The token a live code stands for, once, to the host it was minted for.

    Raises:
        NotFound: malformed, unknown, used, expired, another host's, or for a token no longer live (one answer
            for all, so a caller learns nothing about codes that are not its own).
    """
    now = datetime.now(UTC)
    try:
        async with store.transaction() as conn:
            return await _redeem(conn, vault, caller, hasher.digest(code) if _well_formed(code) else None, now)
    except NotFound:
        async with store.transaction() as conn:
            _refused(conn, caller, now)
        raise


def _well_formed(code: str) -> bool:
    return tokens.well_formed(code, tokens.CLAIM_CODE_PREFIX)


async def _redeem(
    conn: AsyncConnection, vault: Vault, caller: HostCaller, digest: bytes | None, now: datetime
) -> Claimed:
    if digest is None:
        raise NotFound(_NOT_FOUND)
    found = (
        await conn.execute(
            sa.select(C, TOKENS.c.connection_id, TOKENS.c.revoked_at.label("token_revoked_at"))
            .add_columns(TOKENS.c.expires_at.label("token_expires_at"))
            .join(TOKENS, TOKENS.c.id == C.c.token_id)
            .where(C.c.digest == digest)
        )
    ).first()
    if (
        found is None
        or found.host_id != caller.host_id
        or found.workspace_id != caller.workspace_id
        or found.redeemed_at is not None
        or found.expires_at <= now
        or found.secret_sealed is None
        or found.token_revoked_at is not None
        or (found.token_expires_at is not None and found.token_expires_at <= now)
    ):
        raise NotFound(_NOT_FOUND)
    token = vault.open(found.workspace_id, found.id, found.dek_wrapped, found.secret_sealed).token
    # Conditional on still being unused: of two redemptions racing, the second updates nothing.
    used = await conn.execute(
        C.update()
        .where(C.c.id == found.id, C.c.redeemed_at.is_(None))
        .values(redeemed_at=now, kek_id=None, dek_wrapped=None, secret_sealed=None)
    )
    if used.rowcount != 1 or token is None:
        raise NotFound(_NOT_FOUND)
    who = (
        await conn.execute(
            sa.select(schema.members.c.id, schema.members.c.email, schema.gateways.c.slug)
            .select_from(CONNECTIONS)
            .join(schema.members, schema.members.c.id == CONNECTIONS.c.member_id)
            .join(schema.gateways, schema.gateways.c.id == CONNECTIONS.c.gateway_id)
            .where(CONNECTIONS.c.id == found.connection_id)
        )
    ).one()
    detail: JSONObject = {"host": caller.host_id, "host_key": caller.key_id, "connection": found.connection_id}
    action(conn, _host_actor(caller), "claim.redeemed", f"token:{found.token_id}", detail)
    return Claimed(token, found.token_id, found.connection_id, who.id, who.email, who.slug)


def _refused(conn: AsyncConnection, caller: HostCaller, now: datetime) -> None:
    record(
        conn,
        AuditEvent(
            id=new_id(),
            occurred_at=now,
            kind="admin",
            method="claim.redeemed",
            outcome="denied",
            workspace=caller.workspace_id,
            correlation_id=request_id_var.get(),
            actor=f"host:{caller.host_name}",
            host_id=caller.host_id,
            reason="unknown, used, expired or another host's claim code",
            detail={"host_key": caller.key_id},
        ),
    )
