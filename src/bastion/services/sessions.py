"""Web sessions: the cookie holds a random secret, the database its digest; idle and absolute expiry; CSRF tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import rows, schema
from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.ids import new_id
from bastion.domain.models import Member, MemberStatus
from bastion.services import roles
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import MemberId, WorkspaceId

S = schema.web_sessions
M = schema.members

SESSION_PREFIX: Final = "bsw_"
BROWSER_PREFIX: Final = "bsb_"
# A session's last use is written at most this often: enough for the idle timeout, not a write per page.
TOUCH_INTERVAL: Final = timedelta(minutes=1)
USER_AGENT_MAX_CHARS: Final = 200


class SessionKeys:
    """Keys derived from ``secret_key`` for values computed from a cookie: CSRF tokens and browser bindings."""

    __slots__ = ("_key",)

    def __init__(self, secret_key: bytes) -> None:
        self._key = hmac.new(secret_key, b"bastion web sessions v1", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "SessionKeys(<hidden>)"

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def csrf_token(self, cookie_secret: str) -> str:
        """The token every form and htmx request of this browser must send back."""
        return base64.urlsafe_b64encode(self._mac("csrf", cookie_secret)).decode("ascii").rstrip("=")

    def csrf_ok(self, cookie_secret: str, presented: str) -> bool:
        return hmac.compare_digest(self.csrf_token(cookie_secret).encode(), presented.encode("utf-8", "replace"))

    def browser(self, cookie_secret: str) -> str:
        """An opaque 64-character handle for "this browser" that OAuth states are bound to."""
        return self._mac("browser", cookie_secret).hex()


@dataclass(frozen=True, slots=True)
class Lifetimes:
    idle: timedelta = timedelta(hours=2)
    absolute: timedelta = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class WebSession:
    id: str
    workspace_id: WorkspaceId
    member_id: MemberId
    method: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A live session, its member and what they may do. The cookie secret never prints."""

    session: WebSession
    member: Member
    actor: Actor
    secret: str = field(repr=False)


def new_browser_secret() -> str:
    return tokens.mint(BROWSER_PREFIX)


def well_formed_browser_secret(value: str) -> bool:
    return tokens.well_formed(value, BROWSER_PREFIX)


def _row(row: sa.Row[Any]) -> WebSession:
    return WebSession(
        id=row.id,
        workspace_id=WorkspaceId(row.workspace_id),
        member_id=MemberId(row.member_id),
        method=row.method,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        expires_at=row.expires_at,
    )


async def start(
    store: Store, hasher: KeyHasher, member: Member, *, method: str, user_agent: str, lifetimes: Lifetimes
) -> tuple[WebSession, str]:
    """A new session for ``member``; the secret (the cookie value) is returned once and stored as a digest."""
    secret = tokens.mint(SESSION_PREFIX)
    now = datetime.now(UTC)
    session_id = new_id()
    values = {
        "id": session_id,
        "workspace_id": member.workspace_id,
        "digest": hasher.digest(secret),
        "member_id": member.id,
        "method": method,
        "user_agent": "".join(c for c in user_agent[:USER_AGENT_MAX_CHARS] if c.isprintable()),
        "created_at": now,
        "last_seen_at": now,
        "expires_at": now + lifetimes.absolute,
        "revoked_at": None,
    }
    async with store.transaction() as conn:
        await conn.execute(S.insert().values(**values))
        actor = Actor(
            workspace_id=member.workspace_id, member_id=member.id, capabilities=frozenset(), label=member.email
        )
        action(conn, actor, "member.signed_in", f"member:{member.id}", {"method": method, "session": session_id})
    return (
        WebSession(session_id, member.workspace_id, member.id, method, now, now, now + lifetimes.absolute),
        secret,
    )


async def resolve(store: Store, hasher: KeyHasher, secret: str, lifetimes: Lifetimes) -> SignedIn | None:
    """The live session behind a cookie value, or None (unknown, revoked, idle too long, past its end, disabled)."""
    if not tokens.well_formed(secret, SESSION_PREFIX):
        return None
    digest = hasher.digest(secret)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        found = (await conn.execute(sa.select(S).where(S.c.digest == digest))).first()
        if found is None or not hmac.compare_digest(found.digest, digest) or found.revoked_at is not None:
            return None
        session = _row(found)
        if now >= session.expires_at or now - session.last_seen_at >= lifetimes.idle:
            return None
        member_row = (await conn.execute(sa.select(M).where(M.c.id == session.member_id))).first()
        if member_row is None:
            return None
        member = rows.member(member_row)
        if member.status is not MemberStatus.ACTIVE:
            return None
        role = await roles.find(conn, member.workspace_id, member.role_id)
        if now - session.last_seen_at >= TOUCH_INTERVAL:
            await conn.execute(S.update().where(S.c.id == session.id).values(last_seen_at=now))
    actor = Actor(
        workspace_id=member.workspace_id, member_id=member.id, capabilities=role.capabilities, label=member.email
    )
    return SignedIn(session, member, actor, secret)


async def end(store: Store, signed_in: SignedIn) -> None:
    """Sign out: the session is revoked at once, on every replica (each request reads it)."""
    async with store.transaction() as conn:
        await conn.execute(
            S.update()
            .where(S.c.id == signed_in.session.id, S.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        action(
            conn,
            signed_in.actor,
            "member.signed_out",
            f"member:{signed_in.member.id}",
            {"session": signed_in.session.id},
        )


async def end_all(conn: AsyncConnection, member_id: str) -> None:
    """Revoke every session of a member (a new password ends the old ones)."""
    await conn.execute(
        S.update().where(S.c.member_id == member_id, S.c.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
    )


async def sweep(store: Store, lifetimes: Lifetimes) -> int:
    """Delete sessions that can no longer be used; their drafts go with them."""
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        result = await conn.execute(
            S.delete().where(
                sa.or_(S.c.expires_at <= now, S.c.revoked_at.is_not(None), S.c.last_seen_at <= now - lifetimes.idle)
            )
        )
    return result.rowcount
