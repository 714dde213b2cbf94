"""Revoking an OAuth identity's tokens at its authorization server (RFC 7009) before the identity is deleted.

What to revoke is gathered inside the deleting use case's transaction; the requests go out after it,
with no transaction open. The refresh token goes first (revoking it ends the grant on most servers), then
the access token. A server without a revocation endpoint, or one that fails, is logged as a warning and
never stops the deletion: the row and its data key are destroyed either way (crypto-shredding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx2
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.seals import binding_for
from bastion.domain.identities import IdentityKind
from bastion.errors import BastionError
from bastion.oauth import tokens
from bastion.oauth.model import ClientCredentials, OAuthError
from bastion.oauth.refresh import client_credentials
from bastion.vault.crypto import VaultError
from bastion.vault.sealer import Vault

logger = logging.getLogger("bastion.oauth")
T = schema.identities


class Outcome(StrEnum):
    """What happened to an identity's tokens at its authorization server (recorded in the audit event)."""

    REVOKED = "revoked"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"  # the server has no revocation endpoint


@dataclass(frozen=True, slots=True)
class Revocation:
    """One OAuth identity's tokens and where to revoke them. Tokens never print."""

    identity_id: str
    endpoint: str | None
    client: ClientCredentials | None
    refresh_token: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)


class Revoker:
    """Gathers (in a transaction) and sends (after it) revocations for identities about to be deleted."""

    def __init__(self, vault: Vault, http: Callable[[], httpx2.AsyncClient]) -> None:
        self._vault = vault
        self._http = http

    def __repr__(self) -> str:
        return "Revoker()"

    async def gather(
        self, conn: AsyncConnection, workspace_id: str, *where: sa.ColumnElement[bool]
    ) -> list[Revocation]:
        """The OAuth identities of ``workspace_id`` matching ``where``, with their tokens opened."""
        query = sa.select(T).where(T.c.workspace_id == workspace_id, T.c.kind == IdentityKind.OAUTH.value, *where)
        return await self.gather_rows(conn, (await conn.execute(query.order_by(T.c.id))).all())

    async def gather_rows(self, conn: AsyncConnection, found: Iterable[sa.Row[Any]]) -> list[Revocation]:
        """Revocations for rows sealed like identities (``id``, ``workspace_id``, ``details``, ``dek_wrapped``,
        ``secret_sealed`` and the binding's ``server_id``, ``owner_id``, ``sealed_bound``): an identity's, or an
        enrollment draft's OAuth choice, sealed under its future id. A row whose seal does not open (tampered,
        or unbound where every seal is bound) is logged and left out: its grant cannot be revoked, and that must
        not keep the row from being deleted."""
        out: list[Revocation] = []
        for row in found:
            details = dict(row.details)
            try:
                secret = self._vault.open(
                    row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed, await binding_for(conn, row)
                )
            except VaultError as exc:
                logger.warning("an OAuth grant could not be opened to revoke it (%s)", exc.code, extra={"row": row.id})
                continue
            client_row = details.get("oauth_client")
            endpoint = details.get("revocation_endpoint")
            out.append(
                Revocation(
                    identity_id=row.id,
                    endpoint=endpoint if isinstance(endpoint, str) and endpoint else None,
                    client=(
                        await client_credentials(conn, self._vault, row.workspace_id, client_row)
                        if isinstance(client_row, str)
                        else None
                    ),
                    refresh_token=secret.refresh_token,
                    access_token=secret.access_token,
                )
            )
        return out

    async def revoke(self, revocations: Iterable[Revocation]) -> dict[str, Outcome]:
        """Revoke each identity's refresh token, then its access token; never raises. Outcome per identity id."""
        outcomes: dict[str, Outcome] = {}
        pending = list(revocations)
        if not pending:
            return outcomes
        async with self._http() as http:
            for revocation in pending:
                outcomes[revocation.identity_id] = await self._revoke_one(http, revocation)
        return outcomes

    async def _revoke_one(self, http: httpx2.AsyncClient, revocation: Revocation) -> Outcome:
        if revocation.endpoint is None or revocation.client is None:
            logger.warning(
                "the identity's authorization server has no revocation endpoint; its tokens stay valid until "
                "they expire",
                extra={"identity_id": revocation.identity_id},
            )
            return Outcome.UNSUPPORTED
        outcome = Outcome.REVOKED
        for token, hint in ((revocation.refresh_token, "refresh_token"), (revocation.access_token, "access_token")):
            if not token:
                continue
            try:
                await tokens.revoke(http, revocation.endpoint, revocation.client, token=token, hint=hint)
            except (OAuthError, BastionError) as exc:  # BastionError: the outbound policy refused the endpoint
                outcome = Outcome.FAILED
                logger.warning(
                    "token revocation failed; the identity is deleted anyway",
                    extra={"identity_id": revocation.identity_id, "hint": hint, "error": str(exc)},
                )
        return outcome
