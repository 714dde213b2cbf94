"""Enrollment over a connection link: a draft collects the person's identities, approval turns it into a connection.

Nothing in a draft is an identity or a connection yet. Approval claims the draft (once: a second submit is told it
was already approved), creates the identities, counts the link's use, creates the connection and mints its token in
one transaction; cancelling or letting it expire leaves nothing behind. OAuth grants a draft held and drops (cancelled,
expired, cleared or replaced) are revoked at their authorization server (RFC 7009) once the transaction is over.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
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
from bastion.errors import Conflict, Forbidden, Gone, NotFound, ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.oauth.revocation import Revocation, Revoker
from bastion.services import connections, gateways, hosts, identities, links, servers, vault_keys
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import Lifetimes, SignedIn
from bastion.types import JSONObject, MemberId, ServerId, WorkspaceId
from bastion.vault.sealer import Binding, Vault

logger = logging.getLogger("bastion.enrollment")

D = schema.enrollment_drafts
DI = schema.draft_identities
I = schema.identities  # noqa: E741  the identities table
WS = schema.web_sessions

DRAFT_LIFETIME: Final = timedelta(hours=1)
_GONE_STATES: Final = {
    "expired": "This connection link has expired. Ask the person who sent it for a new one.",
    "used_up": "This connection link has been used as many times as it allows. Ask for a new one.",
    "revoked": "This connection link was revoked. Ask the person who sent it for a new one.",
}


ALREADY_APPROVED: Final = (
    "This enrollment was already approved: its connection and token were created then, and the token was shown "
    "once. Find the connection under My connections; if the token was lost, ask an administrator for a new one."
)


class AlreadyApproved(Conflict):
    """A second approval (a double submit, another tab) of a draft one approval already claimed."""

    code = "enrollment_already_approved"
    title = "Already approved"


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


async def start(
    store: Store, hasher: KeyHasher, who: SignedIn, secret: str, *, revoker: Revoker | None = None
) -> Draft:
    """This browser's draft for the link: the one already open, or a new one. Expired drafts are swept first."""
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        expired, _count = await _delete_drafts(conn, revoker, D.c.expires_at <= now)
        info = await _info(conn, await links.find_by_secret(conn, hasher, secret))
        _check_usable(info, who.member.email)
        if info.link.workspace_id != who.member.workspace_id:
            raise NotFound("this connection link does not exist")
        existing = (
            await conn.execute(
                sa.select(D).where(
                    D.c.link_id == info.link.id,
                    D.c.session_id == who.session.id,
                    D.c.expires_at > now,
                    D.c.approved_at.is_(None),
                )
            )
        ).first()
        if existing is not None:
            draft = _draft(existing)
        else:
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
                    approved_at=None,
                )
            )
    await _revoke(revoker, expired)
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
    if row.approved_at is not None:
        raise AlreadyApproved(ALREADY_APPROVED)
    draft = _draft(row)
    if datetime.now(UTC) >= draft.expires_at:
        raise DraftExpired("this enrollment took too long and was discarded; open the connection link again")
    return draft


class DraftExpired(Gone):
    """A draft past its time: ``_drafting`` deletes it (and every other expired one) once the transaction is over."""


@asynccontextmanager
async def _drafting(store: Store, revoker: Revoker | None) -> AsyncGenerator[AsyncConnection, None]:
    """A transaction on a draft; when the draft turns out expired, expired drafts are swept after it rolls back."""
    try:
        async with store.transaction() as conn:
            yield conn
    except DraftExpired:
        await sweep(store, revoker)
        raise


# --- OAuth grants a draft lets go of ------------------------------------------------------------------------------


async def _grants(conn: AsyncConnection, revoker: Revoker | None, *where: sa.ColumnElement[bool]) -> list[Revocation]:
    """The OAuth grants held by the draft choices matching ``where``, opened for revocation before they are deleted.

    Sent by ``_revoke`` once the transaction is over (no request goes out with a transaction open).
    """
    rows = (await conn.execute(sa.select(DI).where(DI.c.source == Source.OAUTH.value, *where).order_by(DI.c.id))).all()
    if not rows:
        return []
    if revoker is None:
        logger.warning("dropping %d OAuth grant(s) of an enrollment without revoking them", len(rows))
        return []
    out: list[Revocation] = []
    for row in rows:
        try:
            out += await revoker.gather_rows(conn, [row])
        except Exception as exc:  # noqa: BLE001  a grant that cannot be opened must not keep its draft alive
            logger.warning(
                "an enrollment's OAuth grant could not be opened for revocation (%s); it is dropped unrevoked",
                type(exc).__name__,
                extra={"identity_id": row.identity_id},
            )
    return out


async def _delete_drafts(
    conn: AsyncConnection, revoker: Revoker | None, *where: sa.ColumnElement[bool]
) -> tuple[list[Revocation], int]:
    """Delete the drafts matching ``where``; the grants they held (to revoke after the transaction), and how many."""
    grants = await _grants(conn, revoker, DI.c.draft_id.in_(sa.select(D.c.id).where(*where)))
    return grants, (await conn.execute(D.delete().where(*where))).rowcount


def _except(grants: Iterable[Revocation], kept: IdentitySecret) -> list[Revocation]:
    """``grants`` without the tokens that are also in ``kept``: a server may hand out the same refresh token again."""
    keep = {t for t in (kept.access_token, kept.refresh_token, kept.token) if t}
    return [
        replace(
            g,
            refresh_token=None if g.refresh_token in keep else g.refresh_token,
            access_token=None if g.access_token in keep else g.access_token,
        )
        for g in grants
    ]


async def _revoke(revoker: Revoker | None, grants: list[Revocation]) -> None:
    """Revoke what a draft let go of; failures are logged as warnings by the revoker, never raised."""
    if revoker is not None and grants:
        await revoker.revoke(grants)


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


async def load(store: Store, who: SignedIn, draft_id: str, *, revoker: Revoker | None = None) -> DraftView:
    async with _drafting(store, revoker) as conn:
        return await _view(conn, await _own_draft(conn, who, draft_id))


async def _replace_choice(
    conn: AsyncConnection, revoker: Revoker | None, draft: Draft, alias: str, values: Mapping[str, Any]
) -> list[Revocation]:
    """Hold ``values`` for ``alias``; the grant of the choice it replaces, if an OAuth one, to revoke afterwards."""
    replaced = await _grants(conn, revoker, DI.c.draft_id == draft.id, DI.c.alias == alias)
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
    return replaced


async def _seal_choice(
    conn: AsyncConnection,
    revoker: Revoker | None,
    vault: Vault,
    hasher: KeyHasher,
    draft: Draft,
    slot: Slot,
    *,
    source: Source,
    secret: IdentitySecret,
    label: str,
    details: Mapping[str, Any],
) -> list[Revocation]:
    # The identity's id is chosen now and bound into the ciphertext, and is the draft row's id too: approval moves
    # the sealed bytes as they are, and key rotation re-wraps draft rows like identity rows.
    identity_id = new_id()
    sealed = vault.seal(draft.workspace_id, identity_id, secret, Binding(slot.server.id, draft.member_id))
    await vault_keys.record_seal(conn, sealed.kek_id)
    fingerprint, last4 = identities.fingerprint(hasher, secret)
    replaced = await _replace_choice(
        conn,
        revoker,
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
            "owner_id": draft.member_id,
            "sealed_bound": True,
        },
    )
    return _except(replaced, secret)


async def set_token(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    who: SignedIn,
    draft_id: str,
    alias: str,
    secret: IdentitySecret,
    *,
    revoker: Revoker | None = None,
) -> None:
    """Hold a pasted token (already validated by ``bearer_secret``) for one server of the draft."""
    async with _drafting(store, revoker) as conn:
        draft = await _own_draft(conn, who, draft_id)
        slot = (await _view(conn, draft)).slot(alias)
        label = f"{slot.server.name} (token)"
        replaced = await _seal_choice(
            conn, revoker, vault, hasher, draft, slot, source=Source.TOKEN, secret=secret, label=label, details={}
        )
    await _revoke(revoker, replaced)


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
    revoker: Revoker | None = None,
) -> str:
    """Hold the tokens an OAuth authorization returned for one server of the draft; returns the draft id."""
    async with _drafting(store, revoker) as conn:
        draft = await _own_draft(conn, who, draft_id)
        slot = (await _view(conn, draft)).slot(alias)
        if slot.server.id != server_id:
            raise ValidationFailed("this authorization was for another server; connect again", field="alias")
        replaced = await _seal_choice(
            conn, revoker, vault, hasher, draft, slot, source=Source.OAUTH, secret=secret, label=label, details=details
        )
    await _revoke(revoker, replaced)
    return draft_id


async def set_existing(
    store: Store, who: SignedIn, draft_id: str, alias: str, identity_id: str, *, revoker: Revoker | None = None
) -> None:
    """Use one of the person's active identities for this server."""
    async with _drafting(store, revoker) as conn:
        draft = await _own_draft(conn, who, draft_id)
        slot = (await _view(conn, draft)).slot(alias)
        picked = next((i for i in slot.existing if i.id == identity_id), None)
        if picked is None:
            raise ValidationFailed("pick one of your active identities for this server", field="identity")
        replaced = await _replace_choice(
            conn,
            revoker,
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
    await _revoke(revoker, replaced)


async def clear(store: Store, who: SignedIn, draft_id: str, alias: str, *, revoker: Revoker | None = None) -> None:
    """Forget what the draft holds for one server (a sealed token is deleted with its row, an OAuth grant revoked)."""
    async with _drafting(store, revoker) as conn:
        draft = await _own_draft(conn, who, draft_id)
        dropped = await _grants(conn, revoker, DI.c.draft_id == draft.id, DI.c.alias == alias)
        await conn.execute(DI.delete().where(DI.c.draft_id == draft.id, DI.c.alias == alias))
    await _revoke(revoker, dropped)


async def cancel(store: Store, who: SignedIn, draft_id: str, *, revoker: Revoker | None = None) -> None:
    """Discard the draft and everything it holds (OAuth grants are revoked)."""
    async with _drafting(store, revoker) as conn:
        draft = await _own_draft(conn, who, draft_id)
        dropped, _count = await _delete_drafts(conn, revoker, D.c.id == draft.id)
    await _revoke(revoker, dropped)


async def latest_draft(store: Store, who: SignedIn) -> str | None:
    """The id of the newest open draft of this session (where a failed OAuth attempt leads back to)."""
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        found = await conn.execute(
            sa.select(D.c.id)
            .where(
                D.c.member_id == who.member.id,
                D.c.session_id == who.session.id,
                D.c.expires_at > now,
                D.c.approved_at.is_(None),
            )
            .order_by(D.c.created_at.desc(), D.c.id.desc())
            .limit(1)
        )
        return found.scalar_one_or_none()


async def sweep(store: Store, revoker: Revoker | None = None, lifetimes: Lifetimes | None = None) -> int:
    """Delete expired drafts, and drafts whose session is over (their sealed tokens go with them, their OAuth grants
    are revoked); how many went. Run before ``sessions.sweep``, whose deletes would take such drafts unrevoked.

    ``lifetimes``: the sessions' idle timeout too (signed out or past their lifetime is known without it).
    """
    now = datetime.now(UTC)
    dead = sa.or_(WS.c.revoked_at.is_not(None), WS.c.expires_at <= now)
    if lifetimes is not None:
        dead = sa.or_(dead, WS.c.last_seen_at <= now - lifetimes.idle)
    async with store.transaction() as conn:
        dropped, count = await _delete_drafts(
            conn, revoker, sa.or_(D.c.expires_at <= now, D.c.session_id.in_(sa.select(WS.c.id).where(dead)))
        )
    await _revoke(revoker, dropped)
    return count


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
            sealed_bound=row.sealed_bound,
            version=1,
            created_at=now,
            updated_at=now,
        )
    )
    detail: JSONObject = {"server": row.server_id, "kind": kind.value, "owner": who.member.id, "via": "enrollment"}
    action(conn, who.actor, "identity.created", f"identity:{row.identity_id}", detail)


async def approve(
    store: Store, hasher: KeyHasher, who: SignedIn, draft_id: str, *, revoker: Revoker | None = None
) -> Enrolled:
    """Create the identities, count the link's use, create the connection and mint its token, all or nothing.

    The draft is claimed first, by a conditional update only one approval can make: a second one (a double submit,
    another tab, a concurrent request on another replica) gets AlreadyApproved and creates nothing.
    """
    async with _drafting(store, revoker) as conn:
        draft = await _own_draft(conn, who, draft_id)
        claimed = await conn.execute(
            D.update().where(D.c.id == draft.id, D.c.approved_at.is_(None)).values(approved_at=datetime.now(UTC))
        )
        if claimed.rowcount != 1:
            raise AlreadyApproved(ALREADY_APPROVED)
        view = await _view(conn, draft)
        _check_usable(view.info, who.member.email)
        missing = [slot.alias for slot in view.slots if slot.choice is None]
        if missing:
            raise ValidationFailed(f"connect {', '.join(missing)} first", field="identities")
        await links.consume(conn, view.info.link, who.member.email, who.actor)
        choices: dict[str, str] = {}
        # Locked: a `vault rebind` re-sealing these rows meanwhile waits, so the identities get what it wrote.
        chosen = sa.select(DI).where(DI.c.draft_id == draft.id).with_for_update()
        held = {r.alias: r for r in (await conn.execute(chosen)).all()}
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
        # The sealed secrets now live in ``identities``; the claimed draft stays (empty) until it expires.
        await conn.execute(DI.delete().where(DI.c.draft_id == draft.id))
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
    revoker: Revoker | None = None,
) -> Identity:
    """Put fresh OAuth tokens into an existing identity of the person's and make it active again.

    The grant it held before is revoked at its authorization server once the new one is stored (tokens the server
    handed out again, unchanged, are kept).
    """
    async with store.transaction() as conn:
        current = await identities.find(conn, who.member.workspace_id, identity_id)
        if current.owner_id != who.member.id or current.server_id != server_id:
            raise NotFound("no such identity")
        replaced: list[Revocation] = []
        if revoker is not None:
            try:
                replaced = _except(await revoker.gather(conn, current.workspace_id, I.c.id == current.id), secret)
            except Exception as exc:  # noqa: BLE001  the old grant unreadable: reconnecting must still work
                logger.warning("the replaced OAuth grant could not be opened for revocation (%s)", type(exc).__name__)
        sealed = vault.seal(current.workspace_id, current.id, secret, Binding(current.server_id, current.owner_id))
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
                "sealed_bound": True,
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
        updated = await identities.find(conn, current.workspace_id, current.id)
    await _revoke(revoker, replaced)
    return updated


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
