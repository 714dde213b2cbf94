"""Bastion's registrations as an OAuth client: ``oauth_clients`` rows, each one client at one authorization server.

A row holds the client id, how Bastion authenticates at the token endpoint, the client secret sealed in the
vault (``vault.seal(workspace_id, row id, IdentitySecret(token=secret))``), and in ``details`` the
authorization server endpoints seen when it was last used. Rows are keyed by issuer, so an upstream that moves
to another authorization server gets a registration of its own there: credentials never travel between
servers (SEP-2352).

One row per (server, issuer) is current; a row never turns into another client, since identities name it
(``details["oauth_client"]``) and refresh with it. A new registration at an issuer gets a new row and the one it
replaces is marked superseded, still there for the identities that name it. ``save`` runs under a lock on the
server and reads the current row again, so two members connecting at once end up on one registration.

A pre-registered client is bound to one issuer. Its secret waits in a template row (issuer ``ANY_ISSUER``, or
the authorization server an admin named) until the first connection moves the row to the issuer actually
discovered; from then on another issuer is refused until an admin registers Bastion there.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.identities import IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, OAuthRegistration
from bastion.errors import NotFound, ValidationFailed
from bastion.oauth.errors import RegistrationFailed
from bastion.oauth.metadata import AuthServerMetadata, issuers_match
from bastion.oauth.model import ClientAuth, ClientCredentials
from bastion.oauth.registration import Registration
from bastion.services import servers, vault_keys
from bastion.services.actions import action
from bastion.types import JSONObject
from bastion.vault.sealer import Vault

__all__ = [
    "ANY_ISSUER",
    "ClientRow",
    "credentials",
    "endpoints_of",
    "find",
    "load",
    "preregistered_secret",
    "save",
    "set_client_secret",
]

T = schema.oauth_clients
ANY_ISSUER: Final = ""
MAX_CLIENT_SECRET_CHARS: Final = 4096
PRE: Final = OAuthRegistration.PRE_REGISTERED


@dataclass(frozen=True, slots=True)
class ClientRow:
    """One registration, secret opened. The secret never prints."""

    id: str
    workspace_id: str
    server_id: str
    issuer: str
    registration: OAuthRegistration
    client_id: str
    auth_method: ClientAuth
    redirect_uri: str
    details: dict[str, Any]
    superseded: bool = False
    client_secret: str | None = field(default=None, repr=False)

    @property
    def credentials(self) -> ClientCredentials:
        return ClientCredentials(self.client_id, self.auth_method, self.client_secret)

    def same_client(self, registration: Registration) -> bool:
        """Whether ``registration`` is this row's client (perhaps with another secret or endpoints)."""
        return self.registration is registration.kind and self.client_id == registration.client_id


def _open(vault: Vault, row: sa.Row[Any]) -> ClientRow:
    secret = None
    if row.secret_sealed is not None and row.dek_wrapped is not None:
        secret = vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed).token
    return ClientRow(
        id=row.id,
        workspace_id=row.workspace_id,
        server_id=row.server_id,
        issuer=row.issuer,
        registration=OAuthRegistration(row.registration),
        client_id=row.client_id,
        auth_method=ClientAuth(row.auth_method),
        redirect_uri=row.redirect_uri,
        details=dict(row.details),
        superseded=row.superseded_at is not None,
        client_secret=secret,
    )


async def find(conn: AsyncConnection, vault: Vault, server_id: str, issuer: str) -> ClientRow | None:
    """The current registration for (server, issuer), if there is one."""
    query = (
        sa.select(T)
        .where(T.c.server_id == server_id, T.c.issuer == issuer, T.c.superseded_at.is_(None))
        .order_by(T.c.created_at.desc(), T.c.id)
    )
    row = (await conn.execute(query)).first()
    return _open(vault, row) if row is not None else None


async def load(conn: AsyncConnection, vault: Vault, workspace_id: str, row_id: str) -> ClientRow:
    """A registration by row id (an OAuth identity's ``details["oauth_client"]``), superseded or not."""
    row = (await conn.execute(sa.select(T).where(T.c.workspace_id == workspace_id, T.c.id == row_id))).first()
    if row is None:
        raise NotFound("no such OAuth client registration")
    return _open(vault, row)


async def credentials(conn: AsyncConnection, vault: Vault, workspace_id: str, row_id: str) -> ClientCredentials:
    """The client credentials a token endpoint call for an identity needs."""
    return (await load(conn, vault, workspace_id, row_id)).credentials


def endpoints_of(server: AuthServerMetadata) -> JSONObject:
    """What ``details`` keeps of the authorization server (no secret in it)."""
    return {
        "authorization_endpoint": server.authorization_endpoint,
        "token_endpoint": server.token_endpoint,
        "revocation_endpoint": server.revocation_endpoint,
        "iss_parameter_supported": server.iss_parameter_supported,
        "legacy": server.legacy,
    }


async def _lock(conn: AsyncConnection, server_id: str) -> None:
    """Hold the server's registrations still until this transaction ends (PostgreSQL: a lock on the server's
    row; SQLite's write transactions already run one at a time)."""
    # FOR NO KEY UPDATE: it serialises saves without waiting for inserts that merely reference the server.
    query = sa.select(schema.servers.c.id).where(schema.servers.c.id == server_id)
    await conn.execute(query.with_for_update(key_share=True))


async def _preregistered_rows(conn: AsyncConnection, vault: Vault, server_id: str, client_id: str) -> list[ClientRow]:
    """Every row of the server's pre-registered client ``client_id``, template and superseded ones included."""
    query = sa.select(T).where(T.c.server_id == server_id, T.c.registration == PRE.value, T.c.client_id == client_id)
    rows = [_open(vault, row) for row in (await conn.execute(query.order_by(T.c.created_at, T.c.id))).all()]
    return sorted(rows, key=lambda row: row.superseded)  # current rows first


def _issuer_changed(rows: list[ClientRow], client_id: str, issuer: str) -> RegistrationFailed | None:
    """The refusal when ``client_id`` is already bound to an issuer other than ``issuer``."""
    bound = sorted({row.issuer for row in rows if row.issuer not in (ANY_ISSUER, issuer)})
    if not bound:
        return None
    return RegistrationFailed(
        f"the authorization server changed (the pre-registered client {client_id} is registered at {bound[0]}, "
        f"the server now uses {issuer}); an admin must re-register Bastion there and update this server's "
        "OAuth settings (client id, authorization server, secret)"
    )


async def preregistered_secret(
    conn: AsyncConnection, vault: Vault, server_id: str, client_id: str, issuer: str, *, pinned: bool
) -> str | None:
    """The secret an admin gave for the pre-registered client ``client_id``, for use at ``issuer`` only.

    Args:
        pinned: the admin named no authorization server, so the client belongs to the first issuer it was
            used at; False when they named one (and ``issuer`` was checked against it).

    Raises:
        RegistrationFailed: ``pinned``, and the client is bound to another issuer already.
    """
    rows = await _preregistered_rows(conn, vault, server_id, client_id)
    for row in rows:
        if row.issuer == issuer:
            return row.client_secret
    if pinned and (refused := _issuer_changed(rows, client_id, issuer)) is not None:
        raise refused
    for row in rows:
        if row.issuer == ANY_ISSUER or issuers_match(issuer, row.issuer):
            return row.client_secret  # the template, not bound yet
    return None


async def save(
    conn: AsyncConnection,
    vault: Vault,
    *,
    workspace_id: str,
    server_id: str,
    issuer: str,
    registration: Registration,
    redirect_uri: str,
    details: JSONObject,
    seen: str | None = None,
    fits: Callable[[ClientRow], bool] | None = None,
    pinned: bool = False,
) -> ClientRow:
    """Make ``registration`` the current one for (server, issuer), or use the one that already is; the row.

    Under the server's lock the current row is read again, then:

    - it is ``registration``'s client: kept, updated in place (endpoints, a new secret);
    - a pre-registered client's template is waiting: it moves to ``issuer`` (refused if ``pinned`` and the
      client is bound to another issuer already, see ``preregistered_secret``);
    - another connection made it current since the caller read the row ``seen`` (an id, None: there was
      none), and ``fits`` it: it is used instead, and ``registration`` is left unused;
    - otherwise ``registration`` gets a new row, and the current one, if any, is marked superseded.

    Raises:
        RegistrationFailed: see ``pinned``.
    """
    await _lock(conn, server_id)
    now = datetime.now(UTC)
    current = await find(conn, vault, server_id, issuer)
    if current is not None and current.same_client(registration):
        await _update(conn, vault, current, registration, redirect_uri, details, issuer=issuer)
        return await load(conn, vault, workspace_id, current.id)
    if registration.kind is PRE:
        rows = await _preregistered_rows(conn, vault, server_id, registration.client_id)
        if pinned and (refused := _issuer_changed(rows, registration.client_id, issuer)) is not None:
            raise refused
        template = next(
            (r for r in rows if not r.superseded and (r.issuer == ANY_ISSUER or issuers_match(issuer, r.issuer))),
            None,
        )
        if template is not None:
            await _supersede(conn, current, now)
            await _update(conn, vault, template, registration, redirect_uri, details, issuer=issuer)
            return await load(conn, vault, workspace_id, template.id)
    elif current is not None and current.id != seen and fits is not None and fits(current):
        return current  # a concurrent connection's registration: everyone's authorization URL names one client
    await _supersede(conn, current, now)
    row_id = new_id()
    await conn.execute(
        T.insert().values(
            id=row_id,
            workspace_id=workspace_id,
            server_id=server_id,
            issuer=issuer,
            registration=registration.kind.value,
            client_id=registration.client_id,
            auth_method=registration.auth_method.value,
            redirect_uri=redirect_uri,
            details=_details(details, registration, None),
            superseded_at=None,
            version=0,
            created_at=now,
            updated_at=now,
        )
    )
    await _reseal(conn, vault, workspace_id, row_id, registration.client_secret)
    return await load(conn, vault, workspace_id, row_id)


def _details(details: JSONObject, registration: Registration, kept: ClientRow | None) -> dict[str, Any]:
    expires = registration.secret_expires_at.isoformat() if registration.secret_expires_at else None
    if expires is None and kept is not None:
        expires = kept.details.get("secret_expires_at")  # the same client again: its registration still ends then
    return {**details, "secret_expires_at": expires}


async def _update(
    conn: AsyncConnection,
    vault: Vault,
    row: ClientRow,
    registration: Registration,
    redirect_uri: str,
    details: JSONObject,
    *,
    issuer: str,
) -> None:
    """Update ``row`` for the same client: where and how it is used, and its secret if that changed."""
    values: dict[str, Any] = {
        "issuer": issuer,
        "auth_method": registration.auth_method.value,
        "redirect_uri": redirect_uri,
        "details": _details(details, registration, row),
        "updated_at": datetime.now(UTC),
        "version": T.c.version + 1,
    }
    await conn.execute(T.update().where(T.c.id == row.id).values(**values))
    if not _same_secret(row.client_secret, registration.client_secret):
        await _reseal(conn, vault, row.workspace_id, row.id, registration.client_secret)


def _same_secret(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


async def _supersede(conn: AsyncConnection, row: ClientRow | None, now: datetime) -> None:
    if row is not None:
        await conn.execute(
            T.update().where(T.c.id == row.id).values(superseded_at=now, updated_at=now, version=T.c.version + 1)
        )


async def _reseal(conn: AsyncConnection, vault: Vault, workspace_id: str, row_id: str, secret: str | None) -> None:
    """Seal ``secret`` into the row under a fresh data key (or clear it), counting a new version of the row."""
    values: dict[str, Any] = {
        "kek_id": None,
        "dek_wrapped": None,
        "secret_sealed": None,
        "updated_at": datetime.now(UTC),
        "version": T.c.version + 1,
    }
    if secret is not None:
        sealed = vault.seal(workspace_id, row_id, IdentitySecret(token=secret))
        await vault_keys.record_seal(conn, sealed.kek_id)
        values.update(kek_id=sealed.kek_id, dek_wrapped=sealed.dek_wrapped, secret_sealed=sealed.secret_sealed)
    await conn.execute(T.update().where(T.c.id == row_id).values(**values))


async def set_client_secret(store: Store, vault: Vault, actor: Actor, server: str, secret: str | None) -> None:
    """Give (or with None, take away) the secret of a server's pre-registered OAuth client.

    The secret is sealed, never shown again, and used from the next connection on. It reaches the rows of the
    client's one issuer (the authorization server the admin named, else the one it is bound to), never a row
    at another issuer: a secret for one authorization server is never sent to another.

    Raises:
        ValidationFailed: the server is not an OAuth server with a pre-registered client id, or the secret is
            not printable.
    """
    actor.require(Capability.SERVERS_MANAGE)
    if secret is not None and (
        not secret or len(secret) > MAX_CLIENT_SECRET_CHARS or not secret.isprintable() or secret != secret.strip()
    ):
        raise ValidationFailed("a client secret is 1-4096 printable characters", field="client_secret")
    async with store.transaction() as conn:
        target = await servers.find(conn, actor.workspace_id, server)
        oauth = target.oauth
        if target.auth_kind is not AuthKind.OAUTH or oauth is None or not oauth.client_id:
            raise ValidationFailed(
                "set the server's pre-registered OAuth client id before its secret", field="client_secret"
            )
        await _lock(conn, target.id)
        named = oauth.authorization_server
        copies = [
            row
            for row in await _preregistered_rows(conn, vault, target.id, oauth.client_id)
            if named is None or issuers_match(row.issuer, named)
        ]
        # Every copy changes in place (identities name their row), the template included.
        for row in copies:
            await _reseal(conn, vault, actor.workspace_id, row.id, secret)
        if secret is not None and not copies:
            now = datetime.now(UTC)
            row_id = new_id()
            await conn.execute(
                T.insert().values(
                    id=row_id,
                    workspace_id=actor.workspace_id,
                    server_id=target.id,
                    issuer=named or ANY_ISSUER,
                    registration=PRE.value,
                    client_id=oauth.client_id,
                    auth_method=ClientAuth.BASIC.value,
                    redirect_uri="",
                    details={},
                    superseded_at=None,
                    version=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            await _reseal(conn, vault, actor.workspace_id, row_id, secret)
        action(
            conn,
            actor,
            "server.oauth_secret_set" if secret is not None else "server.oauth_secret_removed",
            f"server:{target.id}",
            {"client_id": oauth.client_id},
        )
