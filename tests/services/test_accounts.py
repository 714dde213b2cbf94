"""Local accounts: argon2id hashes (upgraded on sign-in), single-use tickets stored as digests, uniform failures."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.to_thread
import argon2
import pytest
import sqlalchemy as sa
from anyio import wait_all_tasks_blocked

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import MemberSpec
from bastion.errors import Forbidden, Gone, ValidationFailed
from bastion.services import accounts, members
from bastion.services.accounts import Passwords, PasswordsBusy, SignInFailed, TicketKind
from bastion.services.apikeys import KeyHasher

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple"
CHEAP = Passwords(time_cost=1, memory_kib=8 * 1024, parallelism=1)


async def _dump(store: Store) -> str:
    """Every row of the account tables and the audit log, as text."""
    out: list[str] = []
    async with store.transaction() as conn:
        for table in (schema.member_passwords, schema.member_tickets, schema.audit_events):
            out += [repr(tuple(row)) for row in (await conn.execute(sa.select(table))).all()]
    return "\n".join(out)


async def _member_with_password(store: Store, hasher: KeyHasher, operator: Actor, passwords: Passwords) -> str:
    member = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    _ticket, secret = await accounts.issue_ticket(store, hasher, operator, member.id, TicketKind.INVITE)
    await accounts.redeem_ticket(store, hasher, passwords, secret, PASSWORD)
    return member.id


async def test_passwords_are_stored_as_argon2id_and_neither_they_nor_tickets_appear_anywhere(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    member = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    ticket, secret = await accounts.issue_ticket(store, hasher, operator, member.id, TicketKind.INVITE)
    assert ticket.kind is TicketKind.INVITE and secret.startswith("bsi_")
    await accounts.redeem_ticket(store, hasher, CHEAP, secret, PASSWORD)
    with pytest.raises(Gone):
        await accounts.redeem_ticket(store, hasher, CHEAP, secret, PASSWORD + " again")
    dumped = await _dump(store)
    assert PASSWORD not in dumped and secret not in dumped
    async with store.transaction() as conn:
        stored = (await conn.execute(sa.select(schema.member_passwords.c.hash))).scalar_one()
    assert stored.startswith("$argon2id$")
    signed_in = await accounts.check_password(store, CHEAP, operator.workspace_id, "ADA@example.com ", PASSWORD)
    assert signed_in.id == member.id


async def test_a_hash_made_with_other_parameters_is_upgraded_at_the_next_sign_in(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    member_id = await _member_with_password(store, hasher, operator, CHEAP)
    stronger = Passwords(time_cost=2, memory_kib=16 * 1024, parallelism=1)
    await accounts.check_password(store, stronger, operator.workspace_id, "ada@example.com", PASSWORD)
    async with store.transaction() as conn:
        stored = (
            await conn.execute(
                sa.select(schema.member_passwords.c.hash).where(schema.member_passwords.c.member_id == member_id)
            )
        ).scalar_one()
    assert "m=16384,t=2,p=1" in stored
    assert not stronger.needs_rehash(stored)


async def test_an_unknown_email_costs_one_verification_like_a_known_one(
    store: Store, hasher: KeyHasher, operator: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _member_with_password(store, hasher, operator, CHEAP)
    calls: list[str] = []
    original = argon2.PasswordHasher.verify

    def counting(self: argon2.PasswordHasher, stored: Any, password: Any) -> bool:
        calls.append(str(password))
        return original(self, stored, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting)
    for email, password in (("nobody@example.com", PASSWORD), ("ada@example.com", "wrong password here")):
        with pytest.raises(SignInFailed) as failed:
            await accounts.check_password(store, CHEAP, operator.workspace_id, email, password)
        assert failed.value.detail == accounts.WRONG_CREDENTIALS
    assert len(calls) == 2


async def test_password_rules_refuse_short_and_trivial_passwords() -> None:
    for bad in ("short", "aaaaaaaaaaaaaaaa", "ada@example.com", "x" * 1025):
        with pytest.raises(ValidationFailed):
            accounts.check_password_rules(bad, "ada@example.com")
    assert accounts.check_password_rules(PASSWORD, "ada@example.com") == PASSWORD


async def test_a_disabled_member_can_neither_redeem_nor_sign_in(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    member_id = await _member_with_password(store, hasher, operator, CHEAP)
    _ticket, secret = await accounts.issue_ticket(store, hasher, operator, member_id, TicketKind.RESET)
    await members.update(store, operator, member_id, {"status": "disabled"})
    with pytest.raises(SignInFailed, match="disabled"):
        await accounts.check_password(store, CHEAP, operator.workspace_id, "ada@example.com", PASSWORD)
    with pytest.raises(Forbidden, match="disabled"):
        await accounts.read_ticket(store, hasher, secret)


async def test_password_hashing_has_threads_of_its_own() -> None:
    """A burst of sign-ins cannot take the thread pool the audit log writes through, nor wait behind it."""
    shared = anyio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(shared.total_tokens))]
    for holder in holders:
        shared.acquire_on_behalf_of_nowait(holder)
    try:
        with anyio.fail_after(60):  # a guard against hanging (the bug), not a measure of speed
            hashed = await CHEAP.hash(PASSWORD)
            assert await CHEAP.verify(hashed, PASSWORD)
    finally:
        for holder in holders:
            shared.release_on_behalf_of(holder)


async def test_password_checks_beyond_the_queue_are_refused_at_once() -> None:
    passwords = Passwords(time_cost=1, memory_kib=8 * 1024, parallelism=1, threads=1, max_waiting=1)
    release = threading.Event()
    started = threading.Event()

    class Waiting(argon2.PasswordHasher):
        """Hashes only once the test lets it: checks stay in flight for as long as the test needs."""

        def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
            started.set()
            release.wait(60)
            return "not a hash"

    passwords._hasher = Waiting()  # pyright: ignore[reportPrivateUsage]
    results: list[str] = []

    async def hash_one() -> None:
        results.append(await passwords.hash(PASSWORD))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(hash_one)  # runs on the one thread
        tasks.start_soon(hash_one)  # waits for it
        await anyio.to_thread.run_sync(started.wait, 60)
        await wait_all_tasks_blocked()
        with pytest.raises(PasswordsBusy, match="too many passwords"):
            await passwords.verify(None, PASSWORD)
        release.set()
    assert results == ["not a hash", "not a hash"]
    assert await passwords.verify(None, PASSWORD) is False  # room again once they are done
