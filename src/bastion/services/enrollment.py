"""Enrollment over a connection link: a draft collects the person's identities, approval turns it into a connection.

Nothing in a draft is an identity or a connection yet. Approval creates the identities, counts the link's use,
creates the connection and mints its token in one transaction, and deletes the draft; cancelling or letting it
expire leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, rows, schema
from bastion.db.store import Store, emit
from bastion.domain import naming
from bastion.domain.connections import AccessToken, Connection, ConnectionLink
from bastion.domain.identities import Identity, IdentityKind, IdentitySecret, IdentityStatus
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, Gateway, Host, IdentityScheme, Server
from bastion.errors import Forbidden, Gone, NotFound, ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.services import connections, gateways, hosts, identities, links, servers, vault_keys
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import SignedIn
from bastion.types import JSONObject, MemberId, ServerId, WorkspaceId
from bastion.vault.sealer import Vault

D = schema.enrollment_drafts
DI = schema.draft_identities
I = schema.identities  # noqa: E741  the identities table

DRAFT_LIFETIME: Final = timedelta(hours=1)
_GONE_STATES: Final = {
    "expired": "This connection link has expired. Ask the person who sent it for a new one.",
    "used_up": "This connection link has been used as many times as it allows. Ask for a new one.",
    "revoked": "This connection link was revoked. Ask the person who sent it for a new one.",
}


class Source(StrEnum):
    """How a draft got its identity for a server."""

    TOKEN = "token"  # noqa: S105  a source name, not a secret
    OAUTH = "oauth"
    EXISTING = "existing"


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What a connection link's landing page shows."""

    link: ConnectionLink
    state: str
    host: Host
    gateway: Gateway
    invited_by: str | None

    @property
    def gone_reason(self) -> str | None:
        return _GONE_STATES.get(self.state)


@dataclass(frozen=True, slots=True)
class Choice:
    """The identity a draft holds for one server; the secret stays sealed."""

    alias: str
    source: Source
    identity_id: str
    label: str
    last4: str
    scope: str | None


@dataclass(frozen=True, slots=True)
class Slot:
    """One server of the gateway that needs the person's own identity."""

    alias: str
    server: Server
    scopes: tuple[str, ...]
    choice: Choice | None
    existing: tuple[Identity, ...]


@dataclass(frozen=True, slots=True)
class Draft:
    id: str
    workspace_id: WorkspaceId
    link_id: str
    member_id: MemberId
    session_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class DraftView:
    draft: Draft
    info: LinkInfo
    slots: tuple[Slot, ...]

    @property
    def ready(self) -> bool:
        return all(slot.choice is not None for slot in self.slots)

    def slot(self, alias: str) -> Slot:
        for slot in self.slots:
            if slot.alias == alias:
                return slot
        raise NotFound(f"this gateway has no server {alias!r} that needs your identity")


@dataclass(frozen=True, slots=True)
class Enrolled:
    """A finished enrollment. The token's secret is here once, for the page that shows it."""

    connection: Connection
    token: AccessToken
    gateway_slug: str
    host_name: str
    secret: str = field(repr=False)


# --- the link ---------------------------------------------------------------------------------------------------


async def _info(conn: AsyncConnection, link: ConnectionLink) -> LinkInfo:
    host = await hosts.find(conn, link.workspace_id, link.host_id)
    gateway = await gateways.find(conn, link.workspace_id, link.gateway_id)
    invited_by: str | None = None
    if link.created_by is not None:
        inviter = (await conn.execute(sa.select(schema.members).where(schema.members.c.id == link.created_by))).first()
        if inviter is not None:
            invited_by = f"{inviter.name} <{inviter.email}>" if inviter.name else inviter.email
    return LinkInfo(link, link.state_at(datetime.now(UTC)), host, gateway, invited_by)


async def open_link(store: Store, hasher: KeyHasher, secret: str) -> LinkInfo:
    """The link behind a URL secret, in any state (NotFound for one that never existed)."""
    async with store.transaction() as conn:
        return await _info(conn, await links.find_by_secret(conn, hasher, secret))


def _check_usable(info: LinkInfo, email: str) -> None:
    reason = info.gone_reason
    if reason is not None:
        raise Gone(reason)
    if not info.link.admits(email):
        raise Forbidden(
            f"This connection link is for invited people only, and {email} is not one of them. "
            "Sign in with the account that was invited, or ask for a link for this one."
        )


# --- drafts -----------------------------------------------------------------------------------------------------


def _draft(row: sa.Row[Any]) -> Draft:
    return Draft(
        id=row.id,
        workspace_id=WorkspaceId(row.workspace_id),
        link_id=row.link_id,
        member_id=MemberId(row.member_id),
        session_id=row.session_id,
        expires_at=row.expires_at,
    )


async def start(store: Store, hasher: KeyHasher, who: SignedIn, secret: str) -> Draft:
    """This browser's draft for the link: the one already open, or a new one. Expired drafts are swept first."""
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        await conn.execute(D.delete().where(D.c.expires_at <= now))
        info = await _info(conn, await links.find_by_secret(conn, hasher, secret))
        _check_usable(info, who.member.email)
        if info.link.workspace_id != who.member.workspace_id:
            raise NotFound("this connection link does not exist")
        existing = (
            await conn.execute(
                sa.select(D).where(D.c.link_id == info.link.id, D.c.session_id == who.session.id, D.c.expires_at > now)
            )
        ).first()
        if existing is not None:
            return _draft(existing)
        draft = Draft(
            new_id(), who.member.workspace_id, info.link.id, who.member.id, who.session.id, now + DRAFT_LIFETIME
        )
        await conn.execute(
            D.insert().values(
                id=draft.id,
                workspace_id=draft.workspace_id,
                link_id=draft.link_id,
                member_id=draft.member_id,
                session_id=draft.session_id,
                created_at=now,
                expires_at=draft.expires_at,
            )
        )
        return draft


async def _own_draft(conn: AsyncConnection, who: SignedIn, draft_id: str) -> Draft:
    """The signed-in person's draft, started in this very session; Gone once it expired."""
    row = (
        await conn.execute(
            sa.select(D).where(D.c.id == draft_id, D.c.member_id == who.member.id, D.c.session_id == who.session.id)
        )
    ).first()
    if row is None:
        raise NotFound("this enrollment is over (approved, cancelled or started in another browser); start again")
    draft = _draft(row)
    if datetime.now(UTC) >= draft.expires_at:
        raise DraftExpired("this enrollment took too long and was discarded; open the connection link again")
    return draft


class DraftExpired(Gone):
    """A draft past its time: ``_drafting`` deletes it (and every other expired one) once the transaction is over."""


@asynccontextmanager
async def _drafting(store: Store) -> AsyncGenerator[AsyncConnection, None]:
    """A transaction on a draft; when the draft turns out expired, expired drafts are swept after it rolls back."""
    try:
        async with store.transaction() as conn:
            yield conn
    except DraftExpired:
        await sweep(store)
        raise


async def _slots(conn: AsyncConnection, draft: Draft, gateway: Gateway) -> tuple[Slot, ...]:
    chosen: dict[str, Choice] = {}
    for row in (await conn.execute(sa.select(DI).where(DI.c.draft_id == draft.id))).all():
        details: Mapping[str, Any] = row.details
        scope = details.get("scope")
        chosen[row.alias] = Choice(
            row.alias,
            Source(row.source),
            row.identity_id,
            row.label,
            str(details.get("last4", "")),
            scope if isinstance(scope, str) else None,
        )
    out: list[Slot] = []
    for entry in gateway.servers:
        if entry.identity_scheme is not IdentityScheme.PER_USER:
            continue
        server = await servers.find(conn, draft.workspace_id, entry.server_id)
        if server.auth_kind is AuthKind.NONE:
            continue
        held = (
            await conn.execute(
                sa.select(I)
                .where(
                    I.c.workspace_id == draft.workspace_id,
                    I.c.owner_id == draft.member_id,
                    I.c.server_id == server.id,
                    I.c.status == IdentityStatus.ACTIVE.value,
                )
                .order_by(I.c.id)
            )
        ).all()
        found = tuple([await identities.find(conn, draft.workspace_id, r.id) for r in held])
        scopes = server.oauth.scopes if server.oauth is not None else ()
        out.append(Slot(entry.alias, server, scopes, chosen.get(entry.alias), found))
    return tuple(out)


async def _view(conn: AsyncConnection, draft: Draft) -> DraftView:
    info = await _info(conn, await links.find(conn, draft.workspace_id, draft.link_id))
    return DraftView(draft, info, await _slots(conn, draft, info.gateway))


async def load(store: Store, who: SignedIn, draft_id: str) -> DraftView:
    async with _drafting(store) as conn:
        return await _view(conn, await _own_draft(conn, who, draft_id))


async def _replace_choice(conn: AsyncConnection, draft: Draft, alias: str, values: Mapping[str, Any]) -> None:
    await conn.execute(DI.delete().where(DI.c.draft_id == draft.id, DI.c.alias == alias))
    await conn.execute(
        DI.insert().values(
            workspace_id=draft.workspace_id,
            draft_id=draft.id,
            alias=alias,
            created_at=datetime.now(UTC),
            **values,
        )
    )


async def _seal_choice(
    conn: AsyncConnection,
    vault: Vault,
    hasher: KeyHasher,
    draft: Draft,
    slot: Slot,
    *,
    source: Source,
    secret: IdentitySecret,
    label: str,
    details: Mapping[str, Any],
) -> None:
    # The identity's id is chosen now and bound into the ciphertext, and is the draft row's id too: approval moves
    # the sealed bytes as they are, and key rotation re-wraps draft rows like identity rows.
    identity_id = new_id()
    sealed = vault.seal(draft.workspace_id, identity_id, secret)
    await vault_keys.record_seal(conn, sealed.kek_id)
    fingerprint, last4 = identities.fingerprint(hasher, secret)
    await _replace_choice(
        conn,
        draft,
        slot.alias,
        {
            "id": identity_id,
            "server_id": slot.server.id,
            "source": source.value,
            "identity_id": identity_id,
            "label": naming.display_name(label[:200], field="label"),
            "details": {**details, "fingerprint": fingerprint, "last4": last4},
            "kek_id": sealed.kek_id,
            "dek_wrapped": sealed.dek_wrapped,
            "secret_sealed": sealed.secret_sealed,
        },
    )


async def set_token(
    store: Store, vault: Vault, hasher: KeyHasher, who: SignedIn, draft_id: str, alias: str, secret: IdentitySecret
) -> None:
    """Hold a pasted token (already validated by ``bearer_secret``) for one server of the draft."""
    async with _drafting(store) as conn:
        draft = await _own_draft(conn, who, draft_id)
        slot = (await _view(conn, draft)).slot(alias)
        label = f"{slot.server.name} (token)"
        await _seal_choice(
            conn, vault, hasher, draft, slot, source=Source.TOKEN, secret=secret, label=label, details={}
        )


async def set_oauth(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    who: SignedIn,
    draft_id: str,
    alias: str,
    *,
    server_id: str,
    secret: IdentitySecret,
    details: Mapping[str, Any],
    label: str,
) -> str:
    """Hold the tokens an OAuth authorization returned for one server of the draft; returns the draft id."""
    async with _drafting(store) as conn:
        draft = await _own_draft(conn, who, draft_id)
        slot = (await _view(conn, draft)).slot(alias)
        if slot.server.id != server_id:
            raise ValidationFailed("this authorization was for another server; connect again", field="alias")
        await _seal_choice(
            conn, vault, hasher, draft, slot, source=Source.OAUTH, secret=secret, label=label, details=details
        )
    return draft_id


async def set_existing(store: Store, who: SignedIn, draft_id: str, alias: str, identity_id: str) -> None:
    """Use one of the person's active identities for this server."""
    async with _drafting(store) as conn:
        draft = await _own_draft(conn, who, draft_id)
        slot = (await _view(conn, draft)).slot(alias)
        picked = next((i for i in slot.existing if i.id == identity_id), None)
        if picked is None:
            raise ValidationFailed("pick one of your active identities for this server", field="identity")
        await _replace_choice(
            conn,
            draft,
            alias,
            {
                "id": new_id(),
                "server_id": slot.server.id,
                "source": Source.EXISTING.value,
                "identity_id": picked.id,
                "label": picked.label,
                "details": {"last4": picked.last4},
                "kek_id": None,
                "dek_wrapped": None,
                "secret_sealed": None,
            },
        )


async def clear(store: Store, who: SignedIn, draft_id: str, alias: str) -> None:
    """Forget what the draft holds for one server (a sealed token is deleted with its row)."""
    async with _drafting(store) as conn:
        draft = await _own_draft(conn, who, draft_id)
        await conn.execute(DI.delete().where(DI.c.draft_id == draft.id, DI.c.alias == alias))


async def cancel(store: Store, who: SignedIn, draft_id: str) -> None:
    """Discard the draft and everything it holds."""
    async with _drafting(store) as conn:
        draft = await _own_draft(conn, who, draft_id)
        await conn.execute(D.delete().where(D.c.id == draft.id))


async def latest_draft(store: Store, who: SignedIn) -> str | None:
    """The id of the newest open draft of this session (where a failed OAuth attempt leads back to)."""
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        found = await conn.execute(
            sa.select(D.c.id)
            .where(D.c.member_id == who.member.id, D.c.session_id == who.session.id, D.c.expires_at > now)
            .order_by(D.c.created_at.desc(), D.c.id.desc())
            .limit(1)
        )
        return found.scalar_one_or_none()


async def sweep(store: Store) -> int:
    """Delete expired drafts (their sealed tokens go with them)."""
    async with store.transaction() as conn:
        return (await conn.execute(D.delete().where(D.c.expires_at <= datetime.now(UTC)))).rowcount


# --- approval ---------------------------------------------------------------------------------------------------


async def _create_identity(conn: AsyncConnection, who: SignedIn, row: sa.Row[Any]) -> None:
    """Move a draft's sealed identity into ``identities`` under the id its ciphertext is bound to."""
    now = datetime.now(UTC)
    details: dict[str, Any] = dict(row.details)
    fingerprint = str(details.pop("fingerprint", ""))
    last4 = str(details.pop("last4", ""))
    kind = IdentityKind.OAUTH if row.source == Source.OAUTH.value else IdentityKind.BEARER
    await conn.execute(
        I.insert().values(
            id=row.identity_id,
            workspace_id=row.workspace_id,
            server_id=row.server_id,
            owner_id=who.member.id,
            kind=kind.value,
            status=IdentityStatus.ACTIVE.value,
            label=row.label,
            fingerprint=fingerprint,
            last4=last4,
            details={**details, "header_names": ["Authorization"]},
            kek_id=row.kek_id,
            dek_wrapped=row.dek_wrapped,
            secret_sealed=row.secret_sealed,
            version=1,
            created_at=now,
            updated_at=now,
        )
    )
    detail: JSONObject = {"server": row.server_id, "kind": kind.value, "owner": who.member.id, "via": "enrollment"}
    action(conn, who.actor, "identity.created", f"identity:{row.identity_id}", detail)


async def approve(store: Store, hasher: KeyHasher, who: SignedIn, draft_id: str) -> Enrolled:
    """Create the identities, count the link's use, create the connection and mint its token, all or nothing."""
    async with _drafting(store) as conn:
        draft = await _own_draft(conn, who, draft_id)
        view = await _view(conn, draft)
        _check_usable(view.info, who.member.email)
        missing = [slot.alias for slot in view.slots if slot.choice is None]
        if missing:
            raise ValidationFailed(f"connect {', '.join(missing)} first", field="identities")
        await links.consume(conn, view.info.link, who.member.email, who.actor)
        choices: dict[str, str] = {}
        held = {r.alias: r for r in (await conn.execute(sa.select(DI).where(DI.c.draft_id == draft.id))).all()}
        for slot in view.slots:
            row = held[slot.alias]
            if row.source != Source.EXISTING.value:
                await _create_identity(conn, who, row)
            choices[slot.alias] = row.identity_id
        connection, token, secret = await connections.provision(
            conn,
            hasher,
            who.actor,
            member_id=who.member.id,
            host=view.info.host.id,
            gateway=view.info.gateway.id,
            identity_choices=choices,
            link_id=view.info.link.id,
        )
        await conn.execute(D.delete().where(D.c.id == draft.id))
    return Enrolled(connection, token, view.info.gateway.slug, view.info.host.name, secret)


# --- reconnecting an identity that needs it ---------------------------------------------------------------------


async def reconnectable(store: Store, who: SignedIn, identity_id: str) -> tuple[Identity, Server]:
    """One of the person's own OAuth identities, with its server, for the reconnect page."""
    async with store.transaction() as conn:
        identity = await identities.find(conn, who.member.workspace_id, identity_id)
        if identity.owner_id != who.member.id:
            raise NotFound("no such identity")
        if identity.kind is not IdentityKind.OAUTH:
            raise ValidationFailed("only identities connected with OAuth can be reconnected", field="identity")
        return identity, await servers.find(conn, identity.workspace_id, identity.server_id)


async def replace_secret(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    who: SignedIn,
    identity_id: str,
    *,
    server_id: ServerId | str,
    secret: IdentitySecret,
    details: Mapping[str, Any],
) -> Identity:
    """Put fresh OAuth tokens into an existing identity of the person's and make it active again."""
    async with store.transaction() as conn:
        current = await identities.find(conn, who.member.workspace_id, identity_id)
        if current.owner_id != who.member.id or current.server_id != server_id:
            raise NotFound("no such identity")
        sealed = vault.seal(current.workspace_id, current.id, secret)
        await vault_keys.record_seal(conn, sealed.kek_id)
        fingerprint, last4 = identities.fingerprint(hasher, secret)
        await crud.update_versioned(
            conn,
            I,
            current.id,
            None,
            {
                "kek_id": sealed.kek_id,
                "dek_wrapped": sealed.dek_wrapped,
                "secret_sealed": sealed.secret_sealed,
                "fingerprint": fingerprint,
                "last4": last4,
                "details": {**dict(details), "header_names": ["Authorization"]},
                "status": IdentityStatus.ACTIVE.value,
                "updated_at": datetime.now(UTC),
            },
            what="identity",
        )
        emit(conn, Changed(Subject.IDENTITY, current.id))
        detail: JSONObject = {"server": current.server_id, "fields": ["secret"], "status": "active", "via": "reconnect"}
        action(conn, who.actor, "identity.updated", f"identity:{current.id}", detail)
        return await identities.find(conn, current.workspace_id, current.id)


async def my_connections(store: Store, who: SignedIn) -> tuple[list[tuple[Connection, str, str]], list[Identity]]:
    """The person's connections (with host name and gateway slug) and identities, for the "My connections" page."""
    async with store.transaction() as conn:
        found = (
            await conn.execute(
                sa.select(schema.connections.c.id)
                .where(schema.connections.c.member_id == who.member.id)
                .order_by(schema.connections.c.id)
            )
        ).all()
        mine: list[tuple[Connection, str, str]] = []
        for row in found:
            connection = await connections.find(conn, who.member.workspace_id, row.id)
            host = await hosts.find(conn, connection.workspace_id, connection.host_id)
            gateway = rows.gateway(
                await crud.fetch_one(
                    conn, schema.gateways, schema.gateways.c.id == connection.gateway_id, what="gateway"
                ),
                (),
            )
            mine.append((connection, host.name, gateway.slug))
        held = (await conn.execute(sa.select(I.c.id).where(I.c.owner_id == who.member.id).order_by(I.c.id))).all()
        owned = [await identities.find(conn, who.member.workspace_id, r.id) for r in held]
    return mine, owned
