"""Keeping OAuth identities alive: refresh before expiry or after a refusal, once per identity at a time.

Single flight: an asyncio lock per identity within a process, and a database lock across processes
(``Store.exclusive``: a PostgreSQL advisory lock; SQLite serves one process). Whoever gets the locks
reads the identity again: another coroutine or process may have refreshed it already, and then its
tokens are used as they are.

Rotated tokens are committed before anyone uses them. If the commit fails after the authorization
server answered, the answer is kept in memory and committed by the next attempt in this process
without asking the server again. If the process is gone, the next attempt (in any process) presents
the old refresh token once: a server with a reuse grace period answers (recovered), a strict one says
``invalid_grant`` and the identity is marked ``needs_reauth`` (no loop: a marked identity is never
refreshed again until its member reconnects it).

``invalid_grant``: read the identity again; if its refresh token changed meanwhile (someone reconnected
it), use the new one; otherwise mark it ``needs_reauth`` with an audit event and stop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import anyio
import httpx2
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.seals import binding_for
from bastion.db.store import Store, emit
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentityKind, IdentitySecret, IdentityStatus
from bastion.errors import BastionError, Unavailable
from bastion.events.bus import Changed, Subject
from bastion.oauth import tokens
from bastion.oauth.model import ClientAuth, ClientCredentials, OAuthError, TokenSet
from bastion.services import vault_keys
from bastion.services.actions import action
from bastion.types import JSONObject, WorkspaceId
from bastion.upstream.refusals import generation
from bastion.vault.sealer import Binding, Vault

if TYPE_CHECKING:
    from bastion.services.apikeys import KeyHasher  # services.apikeys imports members, which imports us

logger = logging.getLogger("bastion.oauth")
REFRESH_SKEW_S: Final = 60.0
# Each refresh in flight holds a database connection for its lock: a bound keeps the pool for everyone else.
MAX_CONCURRENT_REFRESHES: Final = 4
# A changed refresh token after invalid_grant earns one more try; never more.
MAX_ATTEMPTS: Final = 2
# Reads of an identity that changed under a commit (each change is another writer's committed update).
COMMIT_ATTEMPTS: Final = 5
_ACTOR_LABEL: Final = "bastion (token refresh)"
T = schema.identities
CLIENTS = schema.oauth_clients


class NeedsReauth(BastionError):
    """The identity cannot be refreshed: its member has to connect it again."""

    code = "identity_needs_reauth"
    status = 403
    title = "Identity needs re-authentication"


class RefreshFailed(Unavailable):
    """The authorization server could not refresh the identity now (unreachable, or an error other than
    ``invalid_grant``); the identity is left as it was and the next call tries again."""

    code = "identity_refresh_failed"
    title = "Identity refresh failed"


@dataclass(frozen=True, slots=True)
class Live:
    """An identity's credential as it stands, and when its access token expires (None: not known)."""

    secret: IdentitySecret = field(repr=False)
    expires_at: datetime | None

    @property
    def generation(self) -> str | None:
        return generation(self.secret.access_token) if self.secret.access_token else None


@dataclass(frozen=True, slots=True)
class _State:
    """One read of an identity with what refreshing it needs."""

    workspace_id: WorkspaceId
    identity_id: str
    server_id: str
    owner_id: str | None
    kind: IdentityKind
    status: IdentityStatus
    version: int
    details: Mapping[str, Any]
    secret: IdentitySecret = field(repr=False)
    client: ClientCredentials | None

    @property
    def live(self) -> Live:
        return Live(self.secret, expires_at(self.details))


def expires_at(details: Mapping[str, Any]) -> datetime | None:
    """The access token's expiry from an OAuth identity's details (naive times are UTC)."""
    raw = details.get("expires_at")
    if not isinstance(raw, str):
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def client_credentials(
    conn: AsyncConnection, vault: Vault, workspace_id: str, client_row_id: str
) -> ClientCredentials | None:
    """Bastion's registration at an authorization server (an ``oauth_clients`` row), its secret opened."""
    row = (
        await conn.execute(
            sa.select(CLIENTS).where(CLIENTS.c.workspace_id == workspace_id, CLIENTS.c.id == client_row_id)
        )
    ).first()
    if row is None:
        return None
    secret = None
    if row.dek_wrapped is not None and row.secret_sealed is not None:
        secret = vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed).token
    return ClientCredentials(row.client_id, ClientAuth(row.auth_method), secret)


class Refresher:
    """Hands out OAuth identities' live credentials, refreshing them first when they are due."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        hasher: KeyHasher,
        http: Callable[[], httpx2.AsyncClient],
        *,
        skew_s: float = REFRESH_SKEW_S,
    ) -> None:
        self._store = store
        self._vault = vault
        self._hasher = hasher
        self._http = http
        self.skew = timedelta(seconds=skew_s)
        self._locks: dict[str, tuple[anyio.Lock, list[int]]] = {}
        self._slots = anyio.Semaphore(MAX_CONCURRENT_REFRESHES)
        # Answers the server gave whose commit failed: (the refresh token they replace, the answer).
        self._uncommitted: dict[str, tuple[str, TokenSet]] = {}

    def __repr__(self) -> str:
        return f"Refresher(refreshing={len(self._locks)})"

    def expiring(self, moment: datetime | None) -> bool:
        """Whether an access token expiring at ``moment`` must be refreshed before use."""
        return moment is not None and moment - self.skew <= datetime.now(UTC)

    async def live(
        self,
        workspace_id: str,
        identity_id: str,
        *,
        rejected: str | None = None,
        may_retry: Callable[[str], bool] | None = None,
    ) -> Live:
        """The identity's credential, refreshed first if it expires within the skew or is the one refused.

        Args:
            rejected: the generation of an access token an upstream refused (401); refreshed only if it is
                still the stored one (otherwise someone refreshed it already).
            may_retry: asked with the identity's server id by the one call whose rejection leads to a refresh
                (the others waiting meanwhile find it done): False leaves the refused token as it is.

        Raises:
            NeedsReauth: the identity is (now) marked ``needs_reauth``.
            RefreshFailed: the authorization server could not refresh it at the moment.
        """
        state = await self._read(workspace_id, identity_id)
        if not self._due(state, rejected):
            return state.live
        async with (
            self._local(identity_id),
            self._slots,
            self._store.exclusive(f"bastion.oauth.refresh:{identity_id}"),
        ):
            state = await self._read(workspace_id, identity_id)  # another coroutine or process may have done it
            if not self._due(state, rejected):
                return state.live
            if (
                may_retry is not None
                and state.live.generation == rejected
                and not self.expiring(state.live.expires_at)
                and not may_retry(state.server_id)
            ):
                return state.live  # refused only because of the rejection, and its retry is not in the budget
            return await self._refresh(state, rejected)

    def _due(self, state: _State, rejected: str | None) -> bool:
        if state.kind is not IdentityKind.OAUTH:
            return False
        if state.status is IdentityStatus.NEEDS_REAUTH:
            raise NeedsReauth("this identity needs to be connected again")
        if state.status is IdentityStatus.DISABLED:
            return False
        live = state.live
        if not state.secret.access_token:
            return True
        return (rejected is not None and live.generation == rejected) or self.expiring(live.expires_at)

    @asynccontextmanager
    async def _local(self, identity_id: str) -> AsyncGenerator[None, None]:
        """This process's lock for one identity, forgotten when nobody holds or waits for it."""
        entry = self._locks.get(identity_id)
        if entry is None:
            entry = self._locks[identity_id] = (anyio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._locks.pop(identity_id, None)

    async def _read(self, workspace_id: str, identity_id: str) -> _State:
        async with self._store.transaction() as conn:
            return await self._read_in(conn, workspace_id, identity_id)

    async def _read_in(self, conn: AsyncConnection, workspace_id: str, identity_id: str) -> _State:
        row = await crud.fetch_one(conn, T, T.c.workspace_id == workspace_id, T.c.id == identity_id, what="identity")
        details: Mapping[str, Any] = dict(row.details)
        client_row = details.get("oauth_client")
        client = (
            await client_credentials(conn, self._vault, workspace_id, client_row)
            if isinstance(client_row, str)
            else None
        )
        return _State(
            workspace_id=WorkspaceId(row.workspace_id),
            identity_id=row.id,
            server_id=row.server_id,
            owner_id=row.owner_id,
            kind=IdentityKind(row.kind),
            status=IdentityStatus(row.status),
            version=row.version,
            details=details,
            secret=self._vault.open(
                row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed, await binding_for(conn, row)
            ),
            client=client,
        )

    async def _refresh(self, state: _State, rejected: str | None) -> Live:
        """With the locks held: refresh, commit, and only then hand the new tokens out."""
        pending = self._uncommitted.pop(state.identity_id, None)
        if pending is not None and pending[0] == state.secret.refresh_token:
            return await self._commit(state, pending[0], pending[1])  # the server already answered: no second ask
        for _attempt in range(MAX_ATTEMPTS):
            refresh_token = state.secret.refresh_token
            if not refresh_token:
                return await self._mark(state, "no_refresh_token")
            if state.client is None or not isinstance(state.details.get("token_endpoint"), str):
                return await self._mark(state, "no_client")  # the registration is gone: reconnecting makes a new one
            try:
                answer = await self._ask(state, refresh_token)
            except OAuthError as exc:
                if exc.error != "invalid_grant":
                    logger.warning(
                        "token refresh failed",
                        extra={"identity_id": state.identity_id, "error": exc.error, "status": exc.status},
                    )
                    raise RefreshFailed(f"the authorization server could not refresh this identity ({exc})") from None
                latest = await self._read(state.workspace_id, state.identity_id)
                if latest.secret.refresh_token == refresh_token:
                    return await self._mark(state, "invalid_grant")
                # Race recovery: the identity got new tokens while we asked with the old ones.
                if not self._due(latest, rejected):
                    return latest.live
                state = latest
                continue
            try:
                return await self._commit(state, refresh_token, answer)
            except BaseException:
                # Not lost: the next attempt commits this answer instead of presenting a spent refresh token.
                self._uncommitted[state.identity_id] = (refresh_token, answer)
                raise
        return await self._mark(state, "invalid_grant")

    async def _ask(self, state: _State, refresh_token: str) -> TokenSet:
        """One refresh request at the identity's token endpoint.

        Raises:
            OAuthError: the server's refusal, or ``invalid_client`` when Bastion's registration is gone.
        """
        endpoint = state.details.get("token_endpoint")
        resource = state.details.get("resource")
        if state.client is None or not isinstance(endpoint, str):
            raise OAuthError("invalid_client", "the identity names no registered client or token endpoint")
        async with self._http() as http:
            return await tokens.refresh(
                http,
                endpoint,
                state.client,
                refresh_token=refresh_token,
                resource=resource if isinstance(resource, str) else None,
            )

    async def _commit(self, state: _State, used: str, answer: TokenSet) -> Live:
        """Seal the new tokens under a fresh data key, unless the identity was replaced meanwhile.

        The update is conditional on the version read; should the identity change between that read and the
        write (a step-up scope noted by ``services.step_up``, an admin's edit), it is read again and the new
        tokens are merged into what it holds now, so nothing written meanwhile is lost.
        """
        new = IdentitySecret(access_token=answer.access_token, refresh_token=answer.refresh_token or used)
        sealed = self._vault.seal(state.workspace_id, state.identity_id, new, Binding(state.server_id, state.owner_id))
        async with self._store.transaction() as conn:
            for _attempt in range(COMMIT_ATTEMPTS):
                current = await self._read_in(conn, state.workspace_id, state.identity_id)
                if current.secret.refresh_token != used:
                    return current.live  # reconnected while we refreshed: theirs is newer than ours
                details = dict(current.details)
                details.pop("expires_at", None)
                if answer.expires_at is not None:
                    details["expires_at"] = answer.expires_at.isoformat()
                if answer.scope:
                    details["scope"] = answer.scope
                result = await conn.execute(
                    T.update()
                    .where(T.c.id == state.identity_id, T.c.version == current.version)
                    .values(
                        kek_id=sealed.kek_id,
                        dek_wrapped=sealed.dek_wrapped,
                        secret_sealed=sealed.secret_sealed,
                        sealed_bound=True,
                        fingerprint=self._hasher.digest(answer.access_token)[:8].hex(),
                        last4=answer.access_token[-4:] if len(answer.access_token) >= 12 else "…",
                        details=details,
                        version=current.version + 1,
                        updated_at=datetime.now(UTC),
                    )
                )
                if result.rowcount == 1:
                    await vault_keys.record_seal(conn, sealed.kek_id)
                    # No change event: sessions holding the previous access token keep it until it expires or
                    # is refused, so calls in flight on them are not cut off; new calls pick the new token up by
                    # its generation.
                    return Live(new, answer.expires_at)
            raise RefreshFailed("the identity kept changing while it was being refreshed; try again")

    async def _mark(self, state: _State, reason: str) -> Live:
        """Mark the identity ``needs_reauth`` (audited) and raise, unless it was reconnected meanwhile.

        Raises:
            NeedsReauth: always, unless the identity has new tokens, which are then returned.
        """
        async with self._store.transaction() as conn:
            current = await self._read_in(conn, state.workspace_id, state.identity_id)
            if current.status is IdentityStatus.NEEDS_REAUTH:
                raise NeedsReauth("this identity needs to be connected again")
            if current.secret.refresh_token != state.secret.refresh_token:
                return current.live  # reconnected meanwhile
            await crud.update_versioned(
                conn,
                T,
                state.identity_id,
                current.version,
                {"status": IdentityStatus.NEEDS_REAUTH.value, "updated_at": datetime.now(UTC)},
                what="identity",
            )
            emit(conn, Changed(Subject.IDENTITY, state.identity_id))
            actor = Actor(state.workspace_id, None, frozenset(), _ACTOR_LABEL)
            detail: JSONObject = {"server": state.server_id, "owner": state.owner_id, "reason": reason}
            action(conn, actor, "identity.needs_reauth", f"identity:{state.identity_id}", detail)
        logger.warning(
            "identity needs to be connected again", extra={"identity_id": state.identity_id, "reason": reason}
        )
        raise NeedsReauth("this identity's authorization server no longer accepts it; connect it again")
