"""Identities: credentials for one server, private to a member or global to the workspace, sealed in the vault."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.seals import binding_for
from bastion.db.store import Store, emit
from bastion.domain import naming
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.identities import Identity, IdentityKind, IdentitySecret, IdentityStatus
from bastion.domain.ids import new_id
from bastion.errors import ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.oauth.revocation import Outcome, Revoker
from bastion.services import members, servers, vault_keys
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import JSONObject, JSONValue, MemberId, ServerId, WorkspaceId
from bastion.vault.sealer import Binding, Vault

T = schema.identities


def _row(row: sa.Row[Any]) -> Identity:
    return Identity(
        id=row.id,
        workspace_id=WorkspaceId(row.workspace_id),
        server_id=ServerId(row.server_id),
        owner_id=MemberId(row.owner_id) if row.owner_id else None,
        kind=IdentityKind(row.kind),
        status=IdentityStatus(row.status),
        label=row.label,
        fingerprint=row.fingerprint,
        last4=row.last4,
        details=dict(row.details),
        kek_id=row.kek_id,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check_access(actor: Actor, owner_id: str | None) -> None:
    """Members manage their own private identities; others' and global ones need identities.manage."""
    if owner_id is None or owner_id != actor.member_id:
        actor.require(Capability.IDENTITIES_MANAGE)


async def find(conn: AsyncConnection, workspace_id: str, identity_id: str) -> Identity:
    return _row(await crud.fetch_one(conn, T, T.c.workspace_id == workspace_id, T.c.id == identity_id, what="identity"))


def fingerprint(hasher: KeyHasher, secret: IdentitySecret) -> tuple[str, str]:
    primary = secret.primary()
    return hasher.digest(primary)[:8].hex(), primary[-4:] if len(primary) >= 12 else "…"


async def create(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    actor: Actor,
    *,
    server: str,
    secret: IdentitySecret,
    kind: IdentityKind = IdentityKind.BEARER,
    owner: str | None = None,
    shared: bool = False,
    label: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> Identity:
    """Seal and store a credential. ``owner`` (member id or email) defaults to the actor; ``shared`` makes it global."""
    identity_id = new_id()
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        target = await servers.find(conn, actor.workspace_id, server)
        if shared:
            if owner is not None:
                raise ValidationFailed("a global identity has no owner", field="owner")
            owner_id: str | None = None
        elif owner is not None:
            owner_id = (await members.find(conn, actor.workspace_id, owner)).id
        elif actor.member_id is not None:
            owner_id = actor.member_id
        else:
            raise ValidationFailed("name the member who owns this identity, or make it global", field="member")
        _check_access(actor, owner_id)
        sealed = vault.seal(actor.workspace_id, identity_id, secret, Binding(target.id, owner_id))
        await vault_keys.record_seal(conn, sealed.kek_id)
        fp, last4 = fingerprint(hasher, secret)
        header_names = sorted(secret.headers) if secret.headers else (["Authorization"] if secret.primary() else [])
        await conn.execute(
            T.insert().values(
                id=identity_id,
                workspace_id=actor.workspace_id,
                server_id=target.id,
                owner_id=owner_id,
                kind=kind.value,
                status=IdentityStatus.ACTIVE.value,
                label=naming.display_name(label or f"{target.name} ({kind.value})", field="label"),
                fingerprint=fp,
                last4=last4,
                details={**(details or {}), "header_names": header_names},
                kek_id=sealed.kek_id,
                dek_wrapped=sealed.dek_wrapped,
                secret_sealed=sealed.secret_sealed,
                sealed_bound=True,
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
        action(
            conn,
            actor,
            "identity.created",
            f"identity:{identity_id}",
            {"server": target.id, "kind": kind.value, "owner": owner_id},
        )
        return await find(conn, actor.workspace_id, identity_id)


async def get(store: Store, actor: Actor, identity_id: str) -> Identity:
    async with store.transaction() as conn:
        identity = await find(conn, actor.workspace_id, identity_id)
    _check_access(actor, identity.owner_id)
    return identity


async def list_page(
    store: Store,
    actor: Actor,
    *,
    member: str | None = None,
    server: str | None = None,
    shared: bool | None = None,
    every: bool = False,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[Identity]:
    """Own identities by default; another member's, global ones, or ``every`` one need identities.manage."""
    where: list[sa.ColumnElement[bool]] = [T.c.workspace_id == actor.workspace_id]
    async with store.transaction() as conn:
        if every:
            actor.require(Capability.IDENTITIES_MANAGE)
        elif shared:
            actor.require(Capability.IDENTITIES_MANAGE)
            where.append(T.c.owner_id.is_(None))
        else:
            owner_id = (await members.find(conn, actor.workspace_id, member)).id if member else actor.member_id
            _check_access(actor, owner_id)
            where.append(T.c.owner_id == owner_id)
        if server is not None:
            where.append(T.c.server_id == (await servers.find(conn, actor.workspace_id, server)).id)
        found, next_cursor = await crud.page(conn, T, where, cursor=cursor, limit=limit)
    return Page([_row(r) for r in found], next_cursor)


async def update(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    actor: Actor,
    identity_id: str,
    *,
    label: str | None = None,
    status: IdentityStatus | None = None,
    secret: IdentitySecret | None = None,
    expected_version: int | None = None,
) -> Identity:
    """Relabel, enable/disable, or replace the secret (re-sealed under a fresh data key)."""
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, identity_id)
        _check_access(actor, current.owner_id)
        values: dict[str, Any] = {"updated_at": datetime.now(UTC)}
        presents_another = False
        if label is not None:
            values["label"] = naming.display_name(label, field="label")
        if status is not None:
            values["status"] = status.value
        if secret is not None:
            row = await crud.fetch_one(conn, T, T.c.id == current.id, what="identity")
            binding = await binding_for(conn, row)
            was = vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed, binding)
            presents_another = was.outbound_headers() != secret.outbound_headers()
            sealed = vault.seal(actor.workspace_id, current.id, secret, Binding(row.server_id, row.owner_id))
            await vault_keys.record_seal(conn, sealed.kek_id)
            fp, last4 = fingerprint(hasher, secret)
            values.update(
                kek_id=sealed.kek_id,
                dek_wrapped=sealed.dek_wrapped,
                secret_sealed=sealed.secret_sealed,
                sealed_bound=True,
                fingerprint=fp,
                last4=last4,
            )
            if status is None and current.status is IdentityStatus.NEEDS_REAUTH:
                values["status"] = IdentityStatus.ACTIVE.value
        await crud.update_versioned(conn, T, current.id, expected_version, values, what="identity")
        # Its open upstream sessions go only if what they present changed, or it stopped serving.
        stops = values.get("status", IdentityStatus.ACTIVE.value) != IdentityStatus.ACTIVE.value
        emit(conn, Changed(Subject.IDENTITY if presents_another or stops else Subject.IDENTITY_INFO, current.id))
        # "secret" names the change, never the value; the new status shows enabling, disabling and recovery.
        given = {"label": label, "status": status, "secret": secret}
        changed: list[JSONValue] = [name for name in sorted(given) if given[name] is not None]
        status_now: str = values.get("status", current.status.value)
        detail: JSONObject = {"server": current.server_id, "fields": changed, "status": status_now}
        action(conn, actor, "identity.updated", f"identity:{current.id}", detail)
        return await find(conn, actor.workspace_id, current.id)


async def delete(store: Store, actor: Actor, identity_id: str, *, revoker: Revoker | None = None) -> None:
    """Crypto-shred: the row, its wrapped data key and ciphertext go together.

    With a ``revoker``, an OAuth identity's tokens are revoked at its authorization server first (RFC 7009,
    refresh token then access token), outside any transaction; a server without a revocation endpoint, or one
    that fails, is logged and the identity is deleted anyway.
    """
    outcomes: dict[str, Outcome] = {}
    if revoker is not None:
        async with store.transaction() as conn:
            current = await find(conn, actor.workspace_id, identity_id)
            _check_access(actor, current.owner_id)
            pending = await revoker.gather(conn, actor.workspace_id, T.c.id == current.id)
        outcomes = await revoker.revoke(pending)
    async with store.transaction() as conn:
        current = await find(conn, actor.workspace_id, identity_id)
        _check_access(actor, current.owner_id)
        await crud.delete(conn, T, current.id, what="identity")
        emit(conn, Changed(Subject.IDENTITY, current.id))
        detail: JSONObject = {"server": current.server_id}
        if current.id in outcomes:
            detail["revocation"] = outcomes[current.id].value
        action(conn, actor, "identity.deleted", f"identity:{current.id}", detail)


async def open_secret(store: Store, vault: Vault, workspace_id: str, identity_id: str) -> IdentitySecret:
    """The plaintext credential, for the data plane only (no actor: the caller already resolved a Principal)."""
    async with store.transaction() as conn:
        row = await crud.fetch_one(conn, T, T.c.workspace_id == workspace_id, T.c.id == identity_id, what="identity")
        binding = await binding_for(conn, row)
    return vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed, binding)
