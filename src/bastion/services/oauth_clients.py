"""Bastion's registrations as an OAuth client: one ``oauth_clients`` row per (server, authorization server issuer).

A row holds the client id, how Bastion authenticates at the token endpoint, the client secret sealed in the
vault (``vault.seal(workspace_id, row id, IdentitySecret(token=secret))``), and in ``details`` the
authorization server endpoints seen when it was last used. Rows are keyed by issuer, so an upstream that moves
to another authorization server gets a registration of its own there: credentials never travel between
servers (SEP-2352). A pre-registered client's secret waits in a row with the issuer ``ANY_ISSUER`` (or the
admin's issuer) until the first connection copies it to the issuer actually discovered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.identities import IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, OAuthRegistration
from bastion.errors import NotFound, ValidationFailed
from bastion.oauth.metadata import AuthServerMetadata
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
    "find",
    "load",
    "preregistered_secret",
    "save",
    "set_client_secret",
]

T = schema.oauth_clients
ANY_ISSUER: Final = ""
MAX_CLIENT_SECRET_CHARS: Final = 4096


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
    client_secret: str | None = field(default=None, repr=False)

    @property
    def credentials(self) -> ClientCredentials:
        return ClientCredentials(self.client_id, self.auth_method, self.client_secret)


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
        client_secret=secret,
    )


async def find(conn: AsyncConnection, vault: Vault, server_id: str, issuer: str) -> ClientRow | None:
    """The registration for (server, issuer), if there is one."""
    row = (await conn.execute(sa.select(T).where(T.c.server_id == server_id, T.c.issuer == issuer))).first()
    return _open(vault, row) if row is not None else None


async def load(conn: AsyncConnection, vault: Vault, workspace_id: str, row_id: str) -> ClientRow:
    """A registration by row id (an OAuth identity's ``details["oauth_client"]``)."""
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
) -> str:
    """Insert or replace the registration for (server, issuer); its row id (kept across replacements)."""
    row_id = await _row_for(conn, workspace_id, server_id, issuer)
    values: dict[str, Any] = {
        "registration": registration.kind.value,
        "client_id": registration.client_id,
        "auth_method": registration.auth_method.value,
        "redirect_uri": redirect_uri,
        "details": {
            **details,
            "secret_expires_at": registration.secret_expires_at.isoformat() if registration.secret_expires_at else None,
        },
    }
    await conn.execute(T.update().where(T.c.id == row_id).values(**values))
    await _reseal(conn, vault, workspace_id, row_id, registration.client_secret)
    return row_id


async def _row_for(conn: AsyncConnection, workspace_id: str, server_id: str, issuer: str) -> str:
    """The id of the (server, issuer) row, made empty first if there is none."""
    where = (T.c.server_id == server_id, T.c.issuer == issuer)
    existing = (await conn.execute(sa.select(T.c.id).where(*where))).scalar_one_or_none()
    if existing is not None:
        return str(existing)
    now = datetime.now(UTC)
    row_id = new_id()
    try:
        async with conn.begin_nested():
            await conn.execute(
                T.insert().values(
                    id=row_id,
                    workspace_id=workspace_id,
                    server_id=server_id,
                    issuer=issuer,
                    registration=OAuthRegistration.DYNAMIC.value,
                    client_id="",
                    auth_method=ClientAuth.NONE.value,
                    redirect_uri="",
                    details={},
                    version=0,
                    created_at=now,
                    updated_at=now,
                )
            )
    except IntegrityError:  # another replica registered at this issuer a moment ago: this one replaces it
        return str((await conn.execute(sa.select(T.c.id).where(*where))).scalar_one())
    return row_id


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


async def preregistered_secret(conn: AsyncConnection, vault: Vault, server_id: str, issuer: str) -> str | None:
    """The secret an admin gave for the server's pre-registered client, if any (the issuer's row, else any)."""
    for key in (issuer, ANY_ISSUER):
        row = await find(conn, vault, server_id, key)
        if row is not None and row.registration is OAuthRegistration.PRE_REGISTERED and row.client_secret:
            return row.client_secret
    return None


async def set_client_secret(store: Store, vault: Vault, actor: Actor, server: str, secret: str | None) -> None:
    """Give (or with None, take away) the secret of a server's pre-registered OAuth client.

    The secret is sealed, never shown again, and used from the next connection on.

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
        template = oauth.authorization_server or ANY_ISSUER
        copies = (
            await conn.execute(
                sa.select(T.c.id, T.c.issuer).where(
                    T.c.server_id == target.id, T.c.registration == OAuthRegistration.PRE_REGISTERED.value
                )
            )
        ).all()
        # Every copy changes in place (identities name their row), the template row included.
        for row_id, _issuer in copies:
            await _reseal(conn, vault, actor.workspace_id, row_id, secret)
        if secret is not None and template not in {issuer for _id, issuer in copies}:
            await save(
                conn,
                vault,
                workspace_id=actor.workspace_id,
                server_id=target.id,
                issuer=template,
                registration=Registration(OAuthRegistration.PRE_REGISTERED, oauth.client_id, ClientAuth.BASIC, secret),
                redirect_uri="",
                details={},
            )
        action(
            conn,
            actor,
            "server.oauth_secret_set" if secret is not None else "server.oauth_secret_removed",
            f"server:{target.id}",
            {"client_id": oauth.client_id},
        )
