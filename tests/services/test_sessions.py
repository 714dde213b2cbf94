"""Web sessions: digests only in the database, per-session CSRF tokens, and nothing for a disabled member."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import MemberSpec
from bastion.services import members, sessions
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import Lifetimes, SessionKeys

pytestmark = pytest.mark.anyio
KEYS = SessionKeys(b"a test secret key of enough length to be real")


async def test_the_cookie_secret_is_stored_only_as_a_digest_and_resolves_to_its_member(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    member = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    session, secret = await sessions.start(
        store, hasher, member, method="password", user_agent="test\x00agent", lifetimes=Lifetimes()
    )
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(schema.web_sessions))).one()
    assert secret not in repr(tuple(row)) and row.digest == hasher.digest(secret)
    assert row.user_agent == "testagent"
    found = await sessions.resolve(store, hasher, secret, Lifetimes())
    assert found is not None and found.member.id == member.id and found.session.id == session.id
    assert secret not in repr(found)
    assert await sessions.resolve(store, hasher, secret[:-1] + "x", Lifetimes()) is None
    await members.update(store, operator, member.id, {"status": "disabled"})
    assert await sessions.resolve(store, hasher, secret, Lifetimes()) is None


async def test_csrf_tokens_differ_per_session_and_are_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = sessions.new_browser_secret(), sessions.new_browser_secret()
    assert KEYS.csrf_token(first) != KEYS.csrf_token(second)
    assert KEYS.browser(first) != KEYS.browser(second) and len(KEYS.browser(first)) == 64
    compared: list[Any] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert KEYS.csrf_ok(first, KEYS.csrf_token(first))
    assert not KEYS.csrf_ok(first, KEYS.csrf_token(second))
    assert not KEYS.csrf_ok(first, "")
    assert len(compared) == 3
    assert "hidden" in repr(KEYS)
