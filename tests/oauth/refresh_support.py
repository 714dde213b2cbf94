"""Making what enrollment would make, for tests of what comes after it: an OAuth client row and OAuth identities."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import Identity, IdentityKind, IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, Transport
from bastion.domain.specs import MemberSpec, ServerSpec
from bastion.oauth.model import ClientAuth
from bastion.services import identities, members, servers, vault_keys
from bastion.services.apikeys import KeyHasher
from bastion.vault.sealer import Vault
from tests.fixtures.token_server import TokenServer
from tests.mcp_support import serving


async def oauth_client(
    store: Store,
    vault: Vault,
    operator: Actor,
    *,
    server: str,
    issuer: str,
    client_id: str,
    auth_method: ClientAuth = ClientAuth.POST,
    secret: str | None = None,
) -> str:
    """An ``oauth_clients`` row (as a pre-registration would leave it); its id."""
    row_id = new_id()
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": row_id,
        "workspace_id": operator.workspace_id,
        "issuer": issuer,
        "registration": "pre_registered",
        "client_id": client_id,
        "auth_method": auth_method.value,
        "redirect_uri": "http://bastion.test/oauth/callback",
        "details": {},
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }
    async with store.transaction() as conn:
        values["server_id"] = (await servers.find(conn, operator.workspace_id, server)).id
        if secret is not None:
            sealed = vault.seal(operator.workspace_id, row_id, IdentitySecret(token=secret))
            await vault_keys.record_seal(conn, sealed.kek_id)
            values.update(kek_id=sealed.kek_id, dek_wrapped=sealed.dek_wrapped, secret_sealed=sealed.secret_sealed)
        await conn.execute(schema.oauth_clients.insert().values(**values))
    return row_id


async def oauth_identity(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    operator: Actor,
    *,
    server: str,
    owner: str | None,
    issuer: str,
    client_row: str,
    access_token: str,
    refresh_token: str | None,
    expires_at: datetime | None,
    resource: str | None = None,
    revocation: bool = True,
) -> Identity:
    """An OAuth identity as enrollment would store it (``details`` per ``bastion.oauth.model``)."""
    details: dict[str, Any] = {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "oauth_client": client_row,
        "resource": resource,
        "scope": "tools",
    }
    if revocation:
        details["revocation_endpoint"] = f"{issuer}/revoke"
    if expires_at is not None:
        details["expires_at"] = expires_at.isoformat()
    return await identities.create(
        store,
        vault,
        hasher,
        operator,
        server=server,
        secret=IdentitySecret(access_token=access_token, refresh_token=refresh_token),
        kind=IdentityKind.OAUTH,
        owner=owner,
        shared=owner is None,
        details=details,
    )


@asynccontextmanager
async def crm_with_token_server(
    store: Store, vault: Vault, operator: Actor, resource: str, auth: ClientAuth
) -> AsyncIterator[tuple[TokenServer, str, Any]]:
    """A served token server knowing Bastion's client, an OAuth server "crm" at ``resource``, member Ada, and the
    client row: (token server, its URL, the oauth_clients row)."""
    server = TokenServer()
    server.register("bastion-client", auth.value, "client-secret-value")
    await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=resource, auth_kind=AuthKind.OAUTH)
    )
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with serving(server.app()) as url:
        row = await oauth_client(
            store,
            vault,
            operator,
            server="crm",
            issuer=url,
            client_id="bastion-client",
            auth_method=auth,
            secret="client-secret-value",
        )
        yield server, url, row
