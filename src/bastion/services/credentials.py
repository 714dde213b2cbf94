"""The credential each upstream call carries: opened from the vault, with OAuth tokens kept alive.

For OAuth identities this process remembers which access token it handed out (its ``generation``)
and when it expires, so the hot path can tell without the database that a token is due: it is then
refreshed (single flight, see ``oauth.refresh``) and calls move to a session carrying the new token.
An identity that cannot be refreshed fails with ``IdentityNeedsReauth``, whose message and
``reconnect`` link send its member to connect it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from bastion.db.store import Store
from bastion.domain.identities import IdentityKind, IdentityStatus
from bastion.errors import BastionError
from bastion.oauth.refresh import Live, NeedsReauth, Refresher
from bastion.services import identities
from bastion.upstream.refusals import generation
from bastion.upstream.transports import Credential
from bastion.vault.sealer import Vault


class IdentityRequired(BastionError):
    code = "identity_required"
    status = 403
    title = "Identity required"


class IdentityNeedsReauth(BastionError):
    """The member must connect this identity again; ``reconnect`` is where (also named in the message)."""

    code = "identity_needs_reauth"
    status = 403
    title = "Identity needs re-authentication"

    def __init__(self, detail: str, *, reconnect: str | None = None) -> None:
        super().__init__(detail)
        self.reconnect = reconnect


@dataclass(frozen=True, slots=True)
class _Held:
    """The access token this process hands out for an OAuth identity."""

    generation: str | None
    expires_at: datetime | None


def generation_of(credential: Credential) -> str | None:
    """Which access token ``credential`` carries (None for bearer tokens, headers and no credential)."""
    secret = credential.secret
    return generation(secret.access_token) if secret is not None and secret.access_token else None


class Credentials:
    """Opens identities for upstream calls and keeps OAuth ones fresh."""

    def __init__(self, store: Store, vault: Vault, refresher: Refresher | None, public_url: str | None) -> None:
        self._store = store
        self._vault = vault
        self._refresher = refresher
        self._public_url = (public_url or "").rstrip("/")
        self._held: dict[str, _Held] = {}

    def __repr__(self) -> str:
        return f"Credentials(oauth_held={len(self._held)})"

    def forget(self, identity_id: str | None = None) -> None:
        """Drop what is remembered about one identity (it changed), or about all of them."""
        if identity_id is None:
            self._held.clear()
        else:
            self._held.pop(identity_id, None)

    def reconnect_link(self, identity_id: str) -> str:
        """Where the member connects the identity again (relative when no public URL is configured)."""
        return f"{self._public_url}/me/identities/{identity_id}/reconnect"

    def needs_reauth(self, identity_id: str) -> IdentityNeedsReauth:
        link = self.reconnect_link(identity_id)
        return IdentityNeedsReauth(
            f"your identity for this server needs to be connected again: open {link}", reconnect=link
        )

    async def open(self, workspace_id: str, identity_id: str | None) -> Credential:
        """The credential to open a session with, an OAuth identity's refreshed first if it is due.

        Raises:
            IdentityNeedsReauth: the identity is marked, or has just been found, to need reconnecting.
            IdentityRequired: the identity is disabled.
            RefreshFailed: its authorization server could not refresh it now.
        """
        if identity_id is None:
            return Credential(None)
        async with self._store.transaction() as conn:
            identity = await identities.find(conn, workspace_id, identity_id)
        if identity.status is IdentityStatus.NEEDS_REAUTH:
            raise self.needs_reauth(identity_id)
        if identity.status is IdentityStatus.DISABLED:
            raise IdentityRequired("your identity for this server is disabled")
        if identity.kind is IdentityKind.OAUTH and self._refresher is not None:
            return Credential(identity_id, (await self._live(workspace_id, identity_id, None)).secret)
        secret = await identities.open_secret(self._store, self._vault, workspace_id, identity_id)
        return Credential(identity_id, secret)

    async def generation(self, workspace_id: str, identity_id: str | None) -> str | None:
        """The generation of the access token to call with now, renewed first if it expires within the skew.

        None when this process holds no OAuth token for the identity: ``open`` then tells.
        """
        if identity_id is None or self._refresher is None:
            return None
        held = self._held.get(identity_id)
        if held is None:
            return None
        if self._refresher.expiring(held.expires_at):
            return (await self._live(workspace_id, identity_id, None)).generation
        return held.generation

    async def renew(
        self,
        workspace_id: str,
        identity_id: str | None,
        rejected: str | None,
        may_retry: Callable[[str], bool] | None = None,
    ) -> bool:
        """After an upstream refused the token ``rejected`` (HTTP 401): refresh it unless someone already did.

        Returns whether the call may retry with a renewed token: False when there is nothing to renew (not an
        OAuth identity this process handed out) or when ``may_retry`` refused the refresh (`Refresher.live`).
        """
        if identity_id is None or rejected is None or self._refresher is None or identity_id not in self._held:
            return False
        live = await self._live(workspace_id, identity_id, rejected, may_retry)
        return live.generation != rejected

    async def _live(
        self,
        workspace_id: str,
        identity_id: str,
        rejected: str | None,
        may_retry: Callable[[str], bool] | None = None,
    ) -> Live:
        assert self._refresher is not None  # noqa: S101  callers check
        try:
            live = await self._refresher.live(workspace_id, identity_id, rejected=rejected, may_retry=may_retry)
        except NeedsReauth:
            self._held.pop(identity_id, None)
            raise self.needs_reauth(identity_id) from None
        self._held[identity_id] = _Held(live.generation, live.expires_at)
        return live
