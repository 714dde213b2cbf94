"""Map 2: an access token → the person, host, gateway and identities it speaks for. Cached, invalidated by events."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens as token_format
from bastion.domain.connections import Principal
from bastion.domain.models import MemberStatus
from bastion.errors import BastionError, Forbidden, Unauthenticated
from bastion.events.bus import Changed
from bastion.services.apikeys import KeyHasher
from bastion.types import GatewayId, HostId, MemberId, WorkspaceId

DEFAULT_CACHE_TTL_S: Final = 30.0
MAX_CACHE_ENTRIES: Final = 100_000

T = schema.access_tokens
C = schema.connections
M = schema.members
H = schema.hosts
G = schema.gateways
R = schema.roles
E = TypeVar("E", bound=BastionError)


@dataclass(frozen=True, slots=True)
class Refused:
    """Whom a valid but refused token speaks for; attached to the error as ``who`` for the audit log."""

    workspace_id: str
    member_id: str
    member_email: str
    host_id: str
    token_id: str

    def on(self, error: E) -> E:
        error.who = self  # pyright: ignore[reportAttributeAccessIssue]
        return error


CI = schema.connection_identities


class HostDisabled(Forbidden):
    code = "host_disabled"


class ConnectionDisabled(Forbidden):
    code = "connection_disabled"


class MemberDisabled(Forbidden):
    code = "member_disabled"


class GatewayDisabled(Forbidden):
    code = "gateway_disabled"


def _who(principal: Principal) -> Refused:
    return Refused(
        principal.workspace_id, principal.member_id, principal.member_email, principal.host_id, principal.token_id
    )


_PRINCIPAL: Final = sa.select(
    T.c.id.label("token_id"),
    T.c.digest,
    T.c.expires_at,
    T.c.revoked_at,
    T.c.last_used_at,
    T.c.workspace_id,
    C.c.id.label("connection_id"),
    C.c.enabled.label("connection_enabled"),
    M.c.id.label("member_id"),
    M.c.email,
    M.c.status.label("member_status"),
    R.c.name.label("role_name"),
    H.c.id.label("host_id"),
    H.c.name.label("host_name"),
    H.c.enabled.label("host_enabled"),
    G.c.id.label("gateway_id"),
    G.c.slug,
    G.c.enabled.label("gateway_enabled"),
).select_from(
    T.join(C, C.c.id == T.c.connection_id)
    .join(M, M.c.id == C.c.member_id)
    .join(R, R.c.id == M.c.role_id)
    .join(H, H.c.id == C.c.host_id)
    .join(G, G.c.id == C.c.gateway_id)
)


def _refusal(row: Any, now: datetime) -> BastionError | None:
    """Why the token of ``row`` (a ``_PRINCIPAL`` row) is refused now, naming whom it speaks for; None: admitted."""
    who = Refused(row.workspace_id, row.member_id, row.email, row.host_id, row.token_id)
    if row.revoked_at is not None:
        return who.on(Unauthenticated("the access token was revoked"))
    if row.expires_at is not None and now >= row.expires_at:
        return who.on(Unauthenticated("the access token has expired"))
    if not row.host_enabled:
        return who.on(HostDisabled(f"the host {row.host_name!r} is disabled; an admin can enable it again"))
    if not row.connection_enabled:
        return who.on(ConnectionDisabled("this connection is disabled; an admin can enable it again"))
    if row.member_status != MemberStatus.ACTIVE.value:
        return who.on(MemberDisabled("the member this token belongs to is disabled"))
    if not row.gateway_enabled:
        return who.on(GatewayDisabled(f"the gateway {row.slug!r} is disabled"))
    return None


@dataclass(slots=True)
class _Entry:
    principal: Principal
    cached_until: float
    last_used_written: datetime | None


class Resolver:
    """Resolves tokens. A hit costs a dict lookup; any change event empties the cache, and entries age out anyway."""

    def __init__(self, store: Store, hasher: KeyHasher, *, cache_ttl_s: float = DEFAULT_CACHE_TTL_S) -> None:
        self._store = store
        self._hasher = hasher
        self._ttl = cache_ttl_s
        self._cache: dict[bytes, _Entry] = {}
        self._unsubscribe = store.bus.subscribe(self._on_change)

    def __repr__(self) -> str:
        return f"Resolver(cached={len(self._cache)})"

    def _on_change(self, _event: Changed) -> None:
        # Changes are rare next to calls; forgetting everything keeps invalidation obviously correct.
        self._cache.clear()

    def close(self) -> None:
        self._unsubscribe()

    async def resolve(self, presented: str, *, gateway: str | None = None, host: str | None = None) -> Principal:
        """The Principal for ``presented``, checked against the gateway (slug) and host (name) it is used at.

        Raises:
            Unauthenticated: malformed, unknown, revoked or expired token, or one issued for another gateway/host.
            Forbidden: the host, connection, member or gateway is disabled (a subclass says which).
        """
        if not token_format.well_formed(presented, token_format.ACCESS_TOKEN_PREFIX):
            raise Unauthenticated("the access token is malformed")
        digest = self._hasher.digest(presented)
        now = datetime.now(UTC)
        self._store.freshen()  # the embedded database: what a CLI committed meanwhile holds for this call
        entry = self._cache.get(digest)
        if entry is None or entry.cached_until < time.monotonic():
            entry = await self._load(digest, now)
        principal = entry.principal
        if principal.expires_at is not None and now >= principal.expires_at:
            self._cache.pop(digest, None)
            raise _who(principal).on(Unauthenticated("the access token has expired"))
        if (gateway is not None and principal.gateway_slug != gateway) or (
            host is not None and principal.host_name != host
        ):
            raise _who(principal).on(Unauthenticated("the access token was not issued for this gateway"))
        if entry.last_used_written is None or now - entry.last_used_written >= token_format.LAST_USED_WRITE_INTERVAL:
            entry.last_used_written = now
            async with self._store.transaction() as conn:
                await conn.execute(T.update().where(T.c.id == principal.token_id).values(last_used_at=now))
        return principal

    async def refusals(self, token_ids: Iterable[str]) -> dict[str, BastionError]:
        """Which of ``token_ids`` would be refused now, and why (one read, no cache): what is open for them ends."""
        wanted = sorted(set(token_ids))
        if not wanted:
            return {}
        now = datetime.now(UTC)
        async with self._store.transaction() as conn:
            rows = {row.token_id: row for row in (await conn.execute(_PRINCIPAL.where(T.c.id.in_(wanted)))).all()}
        found: dict[str, BastionError] = {}
        for token_id in wanted:
            row = rows.get(token_id)
            refusal = _refusal(row, now) if row is not None else Unauthenticated("the access token is not valid")
            if refusal is not None:
                found[token_id] = refusal
        return found

    async def _load(self, digest: bytes, now: datetime) -> _Entry:
        generation = self._store.bus.generation
        async with self._store.transaction() as conn:
            row = (await conn.execute(_PRINCIPAL.where(T.c.digest == digest))).first()
            if row is None or not hmac.compare_digest(row.digest, digest):
                raise Unauthenticated("the access token is not valid")
            refusal = _refusal(row, now)
            if refusal is not None:
                raise refusal
            mapping = dict(
                (
                    await conn.execute(
                        sa.select(CI.c.alias, CI.c.identity_id).where(CI.c.connection_id == row.connection_id)
                    )
                ).all()
            )
        principal = Principal(
            workspace_id=WorkspaceId(row.workspace_id),
            token_id=row.token_id,
            connection_id=row.connection_id,
            member_id=MemberId(row.member_id),
            member_email=row.email,
            host_id=HostId(row.host_id),
            host_name=row.host_name,
            gateway_id=GatewayId(row.gateway_id),
            gateway_slug=row.slug,
            identities=mapping,
            expires_at=row.expires_at,
            role=row.role_name,
        )
        entry = _Entry(principal, time.monotonic() + self._ttl, row.last_used_at)
        if not self._store.bus.keeps(generation):
            return entry  # a change was published while this was read: answer this call, remember nothing
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[digest] = entry
        return entry
