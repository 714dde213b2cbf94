"""Token format properties (SECURITY-CHECKLIST items 1 and 3)."""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from unittest import mock

import anyio
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.domain.specs import MemberSpec
from bastion.errors import Unauthenticated
from bastion.services import apikeys, members
from bastion.services.apikeys import KeyHasher

PREFIXES = (tokens.API_KEY_PREFIX, tokens.ACCESS_TOKEN_PREFIX)
# Minted once: a strategy that draws from a token must see the same token when Hypothesis replays an example.
MINTED = {prefix: tokens.mint(prefix) for prefix in PREFIXES}
TOKEN_RE = re.compile(r"^(bsk|bst)_[0-9A-Za-z]{32}[0-9A-Za-z]{6}$")
# Substitutes drawn from the alphabet and beyond it: other ASCII, whitespace, look-alikes.
OTHER_CHARS = st.sampled_from(tokens.BASE62_ALPHABET + "_-+/=. \t\n\x00é\u0430")
HASHER = KeyHasher(b"p" * 32)


def mutations(token: str) -> Iterator[str]:
    """Every single-character substitution, deletion and insertion over the base62 alphabet and '_'."""
    alphabet = tokens.BASE62_ALPHABET + "_"
    for i, original in enumerate(token):
        yield token[:i] + token[i + 1 :]
        for ch in alphabet:
            if ch != original:
                yield token[:i] + ch + token[i + 1 :]
    for i in range(len(token) + 1):
        for ch in alphabet:
            yield token[:i] + ch + token[i:]


@st.composite
def mutated(draw: st.DrawFn, token: str) -> str:
    kind = draw(st.sampled_from(("substitute", "delete", "insert")))
    if kind == "insert":
        i = draw(st.integers(0, len(token)))
        return token[:i] + draw(OTHER_CHARS) + token[i:]
    i = draw(st.integers(0, len(token) - 1))
    if kind == "delete":
        return token[:i] + token[i + 1 :]
    ch = draw(OTHER_CHARS.filter(lambda c: c != token[i]))
    return token[:i] + ch + token[i + 1 :]


class NoDatabase:
    """A store that fails the test if anything asks it for a transaction."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        raise AssertionError("a malformed key reached the database")
        yield  # pragma: no cover


@given(st.sampled_from(PREFIXES), st.integers(0, 10))
def test_every_minted_token_is_well_formed(prefix: str, _draw: int) -> None:
    token = tokens.mint(prefix)
    assert TOKEN_RE.fullmatch(token)
    assert token.startswith(prefix) and len(token) == len(prefix) + tokens.BODY_CHARS + tokens.CHECKSUM_CHARS
    assert tokens.well_formed(token, prefix)
    other = tokens.ACCESS_TOKEN_PREFIX if prefix == tokens.API_KEY_PREFIX else tokens.API_KEY_PREFIX
    assert not tokens.well_formed(token, other)
    assert tokens.last4(token) == token[-4:]


@given(st.data(), st.sampled_from(PREFIXES))
def test_any_single_character_mutation_is_rejected(data: st.DataObject, prefix: str) -> None:
    token = MINTED[prefix]
    changed = data.draw(mutated(token))
    assert changed != token
    assert not tokens.well_formed(changed, prefix)


@given(st.data())
def test_a_mutated_key_is_refused_without_asking_the_store(data: st.DataObject) -> None:
    changed = data.draw(mutated(MINTED[tokens.API_KEY_PREFIX]))

    async def attempt() -> None:
        with pytest.raises(Unauthenticated):
            await apikeys.authenticate(NoDatabase(), HASHER, changed)  # type: ignore[arg-type]

    anyio.run(attempt)


@pytest.mark.anyio
async def test_no_mutation_of_a_real_key_issues_a_single_sql_statement(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    member = await members.create(store, operator, MemberSpec("ada@example.com", "Ada", OWNER_ROLE))
    _key, secret = await apikeys.create(store, hasher, operator, name="k", member=member.id)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    try:
        tried = 0
        for changed in mutations(secret):
            with pytest.raises(Unauthenticated):
                await apikeys.authenticate(store, hasher, changed)
            tried += 1
        assert statements == []
        await apikeys.authenticate(store, hasher, secret)
        assert statements, "the listener sees the queries of a real lookup"
    finally:
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", count)
    assert tried > 40 * 62


@pytest.mark.anyio
async def test_the_key_lookup_compares_digests_in_constant_time(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    member = await members.create(store, operator, MemberSpec("ada@example.com", "Ada", OWNER_ROLE))
    _key, secret = await apikeys.create(store, hasher, operator, name="k", member=member.id)
    with mock.patch.object(apikeys.hmac, "compare_digest", wraps=hmac.compare_digest) as spy:
        actor = await apikeys.authenticate(store, hasher, secret)
    assert actor.member_id == member.id
    assert any(call.args[1] == hasher.digest(secret) for call in spy.call_args_list), spy.call_args_list
