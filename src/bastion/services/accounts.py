"""Local accounts: argon2id passwords, invitations and admin-issued password reset links (single use, digests)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, TypeVar

import anyio.to_thread
import sqlalchemy as sa
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, rows, schema
from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.ids import new_id
from bastion.domain.models import Member, MemberStatus
from bastion.errors import Forbidden, Gone, NotFound, Unauthenticated, Unavailable, ValidationFailed
from bastion.services import members, roles, sessions
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import JSONObject, MemberId, WorkspaceId

T = TypeVar("T")
P = schema.member_passwords
TK = schema.member_tickets
M = schema.members

PASSWORD_MIN_CHARS: Final = 12
PASSWORD_MAX_CHARS: Final = 1024
INVITE_LIFETIME: Final = timedelta(days=7)
RESET_LIFETIME: Final = timedelta(hours=1)
MAX_FAILED_ATTEMPTS: Final = 10
LOCKOUT: Final = timedelta(minutes=15)
# argon2 threads (each holds 46 MiB while it hashes) and how many checks may queue for them before refusals start.
HASH_THREADS: Final = 2
HASH_MAX_WAITING: Final = 16
INVITE_PREFIX: Final = "bsi_"
RESET_PREFIX: Final = "bsr_"
# One message for every failure, so it tells nobody whether the email is a member's or the account is paused.
WRONG_CREDENTIALS: Final = (
    "The email or password is wrong. After 10 wrong tries in a row, sign-in pauses for 15 minutes."
)


class TicketKind(StrEnum):
    INVITE = "invite"
    RESET = "reset"


_PREFIX: Final = {TicketKind.INVITE: INVITE_PREFIX, TicketKind.RESET: RESET_PREFIX}
_LIFETIME: Final = {TicketKind.INVITE: INVITE_LIFETIME, TicketKind.RESET: RESET_LIFETIME}
_PATH: Final = {TicketKind.INVITE: "/welcome/", TicketKind.RESET: "/reset-password/"}


class SignInFailed(Unauthenticated):
    code = "sign_in_failed"
    title = "Sign-in failed"


class PasswordsBusy(Unavailable):
    """Too many password checks are already running or waiting: refused at once rather than queued for long."""

    code = "passwords_busy"
    title = "Too busy"
    retry_after_s: Final = 5


class Passwords:
    """argon2id with OWASP's first recommended setting (46 MiB, 1 pass, 1 lane): tens of milliseconds per check on
    a small server. A stored hash made with other parameters is upgraded at the next successful sign-in.

    Hashing runs off the event loop on threads of its own (``threads`` at a time), never on the thread pool the
    rest of Bastion shares (audit writes before every MCP call use it): a burst of sign-ins cannot starve the
    gateway. Beyond ``threads`` running and ``max_waiting`` waiting, a check is refused at once (PasswordsBusy).
    """

    __slots__ = ("_dummy", "_hasher", "_limiter", "_max_waiting", "_pending", "_threads")

    def __init__(
        self,
        *,
        time_cost: int = 1,
        memory_kib: int = 46 * 1024,
        parallelism: int = 1,
        threads: int = HASH_THREADS,
        max_waiting: int = HASH_MAX_WAITING,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        # Verified when there is no real hash to check, so an unknown email costs as much as a known one. Made on
        # first use: every app (and test) builds a Passwords, few of them check one.
        self._dummy: str | None = None
        self._threads = threads
        self._max_waiting = max_waiting
        self._limiter: anyio.CapacityLimiter | None = None  # made on first use, inside the event loop
        self._pending = 0  # checks running or waiting for a thread

    def __repr__(self) -> str:
        return "Passwords(argon2id)"

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._pending >= self._threads + self._max_waiting:
            raise PasswordsBusy("Bastion is checking too many passwords at once; try again in a few seconds.")
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._threads)
        self._pending += 1
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        finally:
            self._pending -= 1

    async def hash(self, password: str) -> str:
        return await self._run(lambda: self._hasher.hash(password))

    async def verify(self, stored: str | None, password: str) -> bool:
        """True when ``password`` matches ``stored``; with no stored hash, spend the same time and say no."""

        def check() -> bool:
            if self._dummy is None:
                self._dummy = self._hasher.hash("not a password: burns the time a real check takes")
            try:
                return self._hasher.verify(stored or self._dummy, password) and stored is not None
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return await self._run(check)

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)


@dataclass(frozen=True, slots=True)
class Ticket:
    """An invitation or a reset link, as the page that redeems it shows it (never its secret)."""

    id: str
    workspace_id: WorkspaceId
    member_id: MemberId
    email: str
    name: str
    kind: TicketKind
    expires_at: datetime


def ticket_path(secret: str) -> str:
    """Where a ticket's secret is redeemed, relative to the public URL."""
    kind = TicketKind.INVITE if secret.startswith(INVITE_PREFIX) else TicketKind.RESET
    return _PATH[kind] + secret


def check_password_rules(password: str, email: str) -> str:
    """The password as given, or ValidationFailed saying what is wrong with it."""
    if len(password) < PASSWORD_MIN_CHARS:
        raise ValidationFailed(f"use at least {PASSWORD_MIN_CHARS} characters", field="password")
    if len(password) > PASSWORD_MAX_CHARS:
        raise ValidationFailed(f"use at most {PASSWORD_MAX_CHARS} characters", field="password")
    if len(set(password)) < 4 or password.strip().lower() == email.lower():
        raise ValidationFailed("this password is too easy to guess", field="password")
    return password


async def issue_ticket(
    store: Store, hasher: KeyHasher, actor: Actor, member_ref: str, kind: TicketKind
) -> tuple[Ticket, str]:
    """An invitation or reset link for a member; older unused ones of the same kind stop working. Shown once."""
    actor.require(Capability.MEMBERS_MANAGE)
    secret = tokens.mint(_PREFIX[kind])
    now = datetime.now(UTC)
    ticket_id = new_id()
    async with store.transaction() as conn:
        member = await members.find(conn, actor.workspace_id, member_ref)
        members.check_can_manage(actor, await roles.find(conn, actor.workspace_id, member.role_id))
        if member.status is not MemberStatus.ACTIVE:
            raise ValidationFailed("this member is disabled; enable them first", field="member")
        await conn.execute(
            TK.update()
            .where(TK.c.member_id == member.id, TK.c.kind == kind.value, TK.c.used_at.is_(None))
            .values(used_at=now)
        )
        await conn.execute(
            TK.insert().values(
                id=ticket_id,
                workspace_id=member.workspace_id,
                member_id=member.id,
                kind=kind.value,
                digest=hasher.digest(secret),
                expires_at=now + _LIFETIME[kind],
                used_at=None,
                created_by=actor.member_id,
                created_at=now,
            )
        )
        expires = now + _LIFETIME[kind]
        action(conn, actor, f"member.{kind.value}_issued", f"member:{member.id}", {"expires_at": expires.isoformat()})
    return Ticket(ticket_id, member.workspace_id, member.id, member.email, member.name, kind, expires), secret


async def _ticket(conn: AsyncConnection, hasher: KeyHasher, secret: str) -> tuple[Ticket, sa.Row[Any]]:
    if not any(tokens.well_formed(secret, prefix) for prefix in _PREFIX.values()):
        raise NotFound("this link does not exist; ask an administrator for a new one")
    digest = hasher.digest(secret)
    row = (await conn.execute(sa.select(TK).where(TK.c.digest == digest))).first()
    if row is None or not hmac.compare_digest(row.digest, digest):
        raise NotFound("this link does not exist; ask an administrator for a new one")
    member = rows.member(await crud.fetch_one(conn, M, M.c.id == row.member_id, what="member"))
    kind = TicketKind(row.kind)
    if row.used_at is not None:
        raise Gone("this link was already used (or replaced by a newer one); ask an administrator for a new one")
    if datetime.now(UTC) >= row.expires_at:
        raise Gone("this link has expired; ask an administrator for a new one")
    if member.status is not MemberStatus.ACTIVE:
        raise Forbidden("this account is disabled")
    ticket = Ticket(row.id, member.workspace_id, member.id, member.email, member.name, kind, row.expires_at)
    return ticket, row


async def read_ticket(store: Store, hasher: KeyHasher, secret: str) -> Ticket:
    """The live ticket behind a link; NotFound, or Gone once used or expired."""
    async with store.transaction() as conn:
        ticket, _row = await _ticket(conn, hasher, secret)
    return ticket


async def redeem_ticket(store: Store, hasher: KeyHasher, passwords: Passwords, secret: str, password: str) -> Member:
    """Set the member's password through a ticket, once. A reset also signs every session of theirs out."""
    ticket = await read_ticket(store, hasher, secret)
    check_password_rules(password, ticket.email)
    hashed = await passwords.hash(password)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        ticket, _row = await _ticket(conn, hasher, secret)
        used = await conn.execute(TK.update().where(TK.c.id == ticket.id, TK.c.used_at.is_(None)).values(used_at=now))
        if used.rowcount != 1:
            raise Gone("this link was used a moment ago; ask an administrator for a new one")
        await _store_hash(conn, ticket.workspace_id, ticket.member_id, hashed, now)
        await sessions.end_all(conn, ticket.member_id)
        member = rows.member(await crud.fetch_one(conn, M, M.c.id == ticket.member_id, what="member"))
        actor = Actor(
            workspace_id=member.workspace_id, member_id=member.id, capabilities=frozenset(), label=member.email
        )
        action(conn, actor, "member.password_set", f"member:{member.id}", {"via": ticket.kind.value})
    return member


async def _store_hash(conn: AsyncConnection, workspace_id: str, member_id: str, hashed: str, now: datetime) -> None:
    values = {"hash": hashed, "failed_attempts": 0, "locked_until": None, "updated_at": now}
    changed = await conn.execute(P.update().where(P.c.member_id == member_id).values(**values))
    if changed.rowcount == 0:
        await conn.execute(P.insert().values(member_id=member_id, workspace_id=workspace_id, **values))


async def check_password(
    store: Store, passwords: Passwords, workspace_id: WorkspaceId, email: str, password: str
) -> Member:
    """The member behind an email and password, or SignInFailed with one message for every reason.

    Every attempt costs one argon2 verification, whether or not the email is a member's or the account paused.
    """
    now = datetime.now(UTC)
    address = email.strip().lower()
    async with store.transaction() as conn:
        found = (
            await conn.execute(
                sa.select(M, P.c.hash, P.c.locked_until)
                .join(P, P.c.member_id == M.c.id)
                .where(M.c.workspace_id == workspace_id, M.c.email == address)
            )
        ).first()
    if len(password) > PASSWORD_MAX_CHARS:
        found = None  # no argon2 work on a megabyte of input; still spend the time of a normal check
        password = password[:PASSWORD_MAX_CHARS]
    locked = found is not None and found.locked_until is not None and now < found.locked_until
    matched = await passwords.verify(found.hash if found is not None else None, password)
    if found is None:
        raise SignInFailed(WRONG_CREDENTIALS)
    member = rows.member(found)
    actor = Actor(workspace_id=member.workspace_id, member_id=member.id, capabilities=frozenset(), label=member.email)
    if locked or not matched:
        if not locked:
            await _count_failure(store, actor, member.id, now)
        raise SignInFailed(WRONG_CREDENTIALS)
    if member.status is not MemberStatus.ACTIVE:
        raise SignInFailed("this account is disabled; ask an administrator")
    rehashed = await passwords.hash(password) if passwords.needs_rehash(found.hash) else None
    async with store.transaction() as conn:
        values: dict[str, object] = {"failed_attempts": 0, "locked_until": None}
        if rehashed is not None:
            values.update(hash=rehashed, updated_at=now)
        await conn.execute(P.update().where(P.c.member_id == member.id).values(**values))
    return member


async def _count_failure(store: Store, actor: Actor, member_id: str, now: datetime) -> None:
    async with store.transaction() as conn:
        await conn.execute(P.update().where(P.c.member_id == member_id).values(failed_attempts=P.c.failed_attempts + 1))
        count = (await conn.execute(sa.select(P.c.failed_attempts).where(P.c.member_id == member_id))).scalar_one()
        detail: JSONObject = {"attempts": int(count)}
        if count >= MAX_FAILED_ATTEMPTS:
            await conn.execute(
                P.update().where(P.c.member_id == member_id).values(failed_attempts=0, locked_until=now + LOCKOUT)
            )
            detail["paused_until"] = (now + LOCKOUT).isoformat()
        action(conn, actor, "member.sign_in_failed", f"member:{member_id}", detail)


async def has_password(store: Store, member_id: str) -> bool:
    async with store.transaction() as conn:
        return (await conn.execute(sa.select(P.c.member_id).where(P.c.member_id == member_id))).first() is not None


async def find_active_by_email(conn: AsyncConnection, workspace_id: str, email: str) -> Member | None:
    row = (await conn.execute(sa.select(M).where(M.c.workspace_id == workspace_id, M.c.email == email))).first()
    return rows.member(row) if row is not None else None


def ticket_url(base: str, secret: str) -> str:
    return base.rstrip("/") + ticket_path(secret)
