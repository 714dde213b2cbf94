"""Map 1: person -> access token, kept in SQLite or PostgreSQL, tokens sealed at rest, updated by webhook events.

Events may arrive late, twice or out of order (retries): each concern of a connection (who the member is, whether it
is enabled, which tokens are live) remembers the version of the event that last set it and only a newer event
changes it. A revoked token leaves a tombstone so that an older ``token.minted`` arriving afterwards cannot revive it.
A disabled host or connection keeps its tokens: re-enabling restores calls with nothing to redeliver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion_agent import _db
from bastion_agent._crypto import TokenCipher
from bastion_agent._errors import Ambiguous, Disabled, NotEnrolled
from bastion_agent._events import CONNECTION_EVENTS, HOST_EVENTS, Event, Member

C = _db.connections
T = _db.tokens
H = _db.hosts
D = _db.deliveries
# Bastion retries a delivery for at least a day; remembering ids for a month covers any retry schedule.
DEDUPE_RETENTION: Final = timedelta(days=30)

Status = Literal["active", "connection_disabled", "host_disabled", "revoked", "no_token"]


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What the map knows of one person's connection. ``status`` says whether calls can go out as them."""

    person: str
    member_id: str
    connection_id: str
    host: str
    gateway: str | None
    mcp_url: str | None
    token_id: str | None
    status: Status
    version: int


@dataclass(frozen=True, slots=True)
class Credential:
    """A usable enrollment and its token (kept out of ``repr``)."""

    enrollment: Enrollment
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Delivered:
    """A token that reached the agent for an event: in the event itself, or redeemed from its claim code."""

    token: str = field(repr=False)
    token_id: str


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of one delivery: ``duplicate`` if its webhook-id was applied before (nothing changed)."""

    duplicate: bool
    changed: bool


class TokenMap:
    """The agent's person -> token map in ``database``: a SQLite or PostgreSQL URL, or an engine the caller keeps.

    ``await TokenMap.open(database, cipher)`` makes one with its tables; or construct it and ``await create_tables()``.

    Raises:
        ValueError: a database other than SQLite or PostgreSQL.
    """

    def __init__(self, database: str | AsyncEngine, cipher: TokenCipher) -> None:
        self._owns_engine = isinstance(database, str)
        self._engine = _db.create_engine(database) if isinstance(database, str) else database
        self._cipher = cipher

    @classmethod
    async def open(cls, database: str | AsyncEngine, cipher: TokenCipher) -> TokenMap:
        """A map in ``database``, its tables created if missing."""
        token_map = cls(database, cipher)
        await token_map.create_tables()
        return token_map

    async def create_tables(self) -> None:
        """Create the map's tables (``bastion_agent_*``) where they do not exist yet."""
        async with self._engine.begin() as conn:
            await conn.run_sync(_db.metadata.create_all)

    def __repr__(self) -> str:
        return f"TokenMap({self._engine.url.render_as_string(hide_password=True)!r})"

    async def close(self) -> None:
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> TokenMap:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- applying events ---------------------------------------------------------------------------------------

    async def seen(self, webhook_id: str) -> bool:
        """Whether a delivery with this webhook-id was applied already."""
        async with self._engine.connect() as conn:
            found = await conn.execute(sa.select(D.c.webhook_id).where(D.c.webhook_id == webhook_id))
            return found.first() is not None

    async def apply(
        self, event: Event, *, webhook_id: str | None = None, delivered: Delivered | None = None
    ) -> Applied:
        """Apply one event (and the token delivered with it) in one transaction, remembering ``webhook_id``.

        Returns once committed. A webhook-id applied before changes nothing and reports ``duplicate``.
        """
        async with self._engine.begin() as conn:
            if webhook_id is not None:
                fresh = await _db.insert_ignoring_conflict(
                    conn, D, {"webhook_id": webhook_id, "event_type": event.type[:64], "received_at": int(time.time())}
                )
                if not fresh and delivered is None:
                    return Applied(duplicate=True, changed=False)
                if not fresh:
                    # The same event raced in twice and the other copy was applied without a token (its claim was
                    # refused as already used, by us): applying it again is idempotent and keeps the token.
                    changed = await self._apply_connection(conn, event, delivered)
                    return Applied(duplicate=True, changed=changed)
                cutoff = int(time.time() - DEDUPE_RETENTION.total_seconds())
                await conn.execute(D.delete().where(D.c.received_at < cutoff))
            if event.type in CONNECTION_EVENTS:
                changed = await self._apply_connection(conn, event, delivered)
            elif event.type in HOST_EVENTS:
                changed = await self._apply_host(conn, event)
            else:  # webhook.test and types this SDK does not know yet: acknowledged, nothing to change
                changed = False
        return Applied(duplicate=False, changed=changed)

    async def _locked_connection(self, conn: AsyncConnection, event: Event, member: Member) -> sa.Row[Any]:
        await _db.insert_ignoring_conflict(
            conn,
            C,
            {
                "connection_id": event.connection_id,
                "member_id": member.id,
                "email": member.email,
                "email_key": member.email.lower(),
                "host": event.host,
                "gateway": event.gateway,
                "mcp_url": event.mcp_url,
                "member_version": -1,
                "enabled": True,  # a connection is enabled until an event says otherwise
                "enabled_version": -1,
                "version": -1,
            },
        )
        query = sa.select(C).where(C.c.connection_id == event.connection_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        return (await conn.execute(query)).one()

    async def _apply_connection(self, conn: AsyncConnection, event: Event, delivered: Delivered | None) -> bool:
        member = event.member
        if event.connection_id is None or member is None:  # parse_event guarantees both for connection events
            raise ValueError("a connection event names its connection and member")
        row = await self._locked_connection(conn, event, member)
        updates: dict[str, Any] = {}
        if event.version > row.member_version:
            updates |= {
                "member_id": member.id,
                "email": member.email,
                "email_key": member.email.lower(),
                "host": event.host,
                "gateway": event.gateway if event.gateway is not None else row.gateway,
                "mcp_url": event.mcp_url if event.mcp_url is not None else row.mcp_url,
                "member_version": event.version,
            }
        switch = {"connection.created": True, "connection.enabled": True, "connection.disabled": False}
        if event.type in switch and event.version > row.enabled_version:
            updates |= {"enabled": switch[event.type], "enabled_version": event.version}
        if event.version > row.version:
            updates["version"] = event.version
        changed = bool(updates)
        if updates:
            await conn.execute(C.update().where(C.c.connection_id == row.connection_id).values(updates))
        if event.type == "token.revoked" and event.token_id is not None:
            changed |= await self._revoke(conn, event.token_id, row.connection_id)
        token = delivered or (Delivered(event.token, event.token_id) if event.token and event.token_id else None)
        if token is not None and event.type != "token.revoked":
            sealed = self._cipher.seal(
                token.token, token_id=token.token_id, connection_id=row.connection_id, member_id=member.id
            )
            changed |= await _db.insert_ignoring_conflict(
                conn,
                T,
                {
                    "token_id": token.token_id,
                    "connection_id": row.connection_id,
                    "sealed": sealed,
                    "minted_version": event.version,
                    "revoked": False,
                },
            )
        return changed

    async def _revoke(self, conn: AsyncConnection, token_id: str, connection_id: str) -> bool:
        tombstone = {"token_id": token_id, "connection_id": connection_id, "sealed": None, "revoked": True}
        if await _db.insert_ignoring_conflict(conn, T, tombstone):
            return True
        done = await conn.execute(
            T.update().where(T.c.token_id == token_id, T.c.revoked.is_(False)).values(sealed=None, revoked=True)
        )
        return done.rowcount == 1

    async def _apply_host(self, conn: AsyncConnection, event: Event) -> bool:
        await _db.insert_ignoring_conflict(conn, H, {"host": event.host, "enabled": True, "version": -1})
        enabled = event.type == "host.enabled"
        done = await conn.execute(
            H.update()
            .where(H.c.host == event.host, H.c.version < event.version)
            .values(enabled=enabled, version=event.version)
        )
        return done.rowcount == 1

    async def forget_token(self, token_id: str) -> None:
        """Drop a token Bastion no longer accepts (the gateway answered 401): it never works again."""
        async with self._engine.begin() as conn:
            await conn.execute(T.update().where(T.c.token_id == token_id).values(sealed=None, revoked=True))

    # -- reading -----------------------------------------------------------------------------------------------

    async def enrollments(self, person: str | None = None) -> list[Enrollment]:
        """Every connection the map holds (or only ``person``'s, matched case-insensitively by email)."""
        query = sa.select(C, H.c.enabled.label("host_enabled")).outerjoin(H, H.c.host == C.c.host)
        if person is not None:
            query = query.where(C.c.email_key == person.lower())
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query.order_by(C.c.email_key, C.c.gateway, C.c.connection_id))).all()
            live = await self._live_tokens(conn, [r.connection_id for r in rows])
            revoked = await self._has_revoked(conn, [r.connection_id for r in rows])
        return [_enrollment(r, live.get(r.connection_id), r.connection_id in revoked) for r in rows]

    async def _live_tokens(self, conn: AsyncConnection, connection_ids: list[str]) -> dict[str, sa.Row[Any]]:
        if not connection_ids:
            return {}
        query = (
            sa.select(T)
            .where(T.c.connection_id.in_(connection_ids), T.c.revoked.is_(False), T.c.sealed.is_not(None))
            .order_by(T.c.minted_version, T.c.token_id)
        )
        return {row.connection_id: row for row in (await conn.execute(query)).all()}  # the newest wins

    async def _has_revoked(self, conn: AsyncConnection, connection_ids: list[str]) -> set[str]:
        if not connection_ids:
            return set()
        query = sa.select(T.c.connection_id).where(T.c.connection_id.in_(connection_ids), T.c.revoked.is_(True))
        return set((await conn.execute(query.distinct())).scalars().all())

    async def credential(self, person: str, *, gateway: str | None = None, link: str | None = None) -> Credential:
        """The token to call the gateway as ``person``.

        Raises:
            NotEnrolled: the map holds no connection of theirs, or none with a live token (carries ``link``).
            Disabled: their connection or the agent's host is disabled (their token stays in the map).
            Ambiguous: they are enrolled through several gateways and ``gateway`` does not pick one.
        """
        found = [e for e in await self.enrollments(person) if gateway is None or e.gateway == gateway]
        if not found:
            raise NotEnrolled(person, link, "unknown")
        gateways = sorted({e.gateway or "" for e in found})
        if len(gateways) > 1:
            raise Ambiguous(person, gateways)
        # Several connections through one gateway (enrolled twice): a usable one first, else the newest state.
        order: dict[Status, int] = {
            "active": 0,
            "host_disabled": 1,
            "connection_disabled": 2,
            "revoked": 3,
            "no_token": 4,
        }
        chosen = min(found, key=lambda e: (order[e.status], -e.version))
        if chosen.status == "host_disabled" or chosen.status == "connection_disabled":
            raise Disabled(person, chosen.status)
        if chosen.status == "revoked" or chosen.status == "no_token":
            raise NotEnrolled(person, link, chosen.status)
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(T).where(T.c.token_id == chosen.token_id))).one()
        if row.sealed is None:  # revoked between the two reads
            raise NotEnrolled(person, link, "revoked")
        token = self._cipher.open(
            row.sealed, token_id=row.token_id, connection_id=chosen.connection_id, member_id=chosen.member_id
        )
        return Credential(chosen, token)


def _enrollment(row: sa.Row[Any], live: sa.Row[Any] | None, any_revoked: bool) -> Enrollment:
    status: Status
    if row.host_enabled is False:
        status = "host_disabled"
    elif not row.enabled:
        status = "connection_disabled"
    elif live is not None:
        status = "active"
    else:
        status = "revoked" if any_revoked else "no_token"
    return Enrollment(
        person=row.email,
        member_id=row.member_id,
        connection_id=row.connection_id,
        host=row.host,
        gateway=row.gateway,
        mcp_url=row.mcp_url,
        token_id=live.token_id if live is not None else None,
        status=status,
        version=row.version,
    )
