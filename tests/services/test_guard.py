"""The guard's cache of a workspace's rules never keeps rules read before a change it was told of."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.policy import Effect
from bastion.events.bus import Changed, Subject
from bastion.services import rules
from bastion.services.guard import Guard
from bastion.services.ratelimits import RateLimiter

pytestmark = pytest.mark.anyio


async def test_rules_read_while_a_change_arrives_are_not_cached(
    store: Store, operator: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = Guard(store, RateLimiter(), b"k" * 32)
    original = rules.load

    async def slow_load(s: Store, workspace_id: str) -> Any:
        found = await original(s, workspace_id)  # reads "no rules" …
        await rules.create_policy(store, operator, effect=Effect.DENY)  # … while a rule is added and announced
        return found

    monkeypatch.setattr(rules, "load", slow_load)
    assert (await guard.rules(operator.workspace_id)).policies == ()
    monkeypatch.setattr(rules, "load", original)
    assert len((await guard.rules(operator.workspace_id)).policies) == 1  # read again, not the stale answer
    store.bus.publish(Changed(Subject.ALL, ""))
    assert len((await guard.rules(operator.workspace_id)).policies) == 1
    await guard.close()
