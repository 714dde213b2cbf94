"""Workspace rules: policy rules, content rules and rate limits are checked, stored, announced and loaded."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.content import ContentAction, ContentTarget
from bastion.domain.ids import new_id
from bastion.domain.models import Transport
from bastion.domain.policy import Effect, SubjectKind
from bastion.domain.ratelimits import LimitPer, Strategy
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, ServerSpec
from bastion.errors import Conflict, Forbidden, NotFound, ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.services import gateways, rules, servers
from bastion.types import MemberId, WorkspaceId

pytestmark = pytest.mark.anyio


async def _gateway(store: Store, operator: Actor, slug: str = "sales") -> str:
    await servers.create(store, operator, ServerSpec("github", Transport.STREAMABLE_HTTP, "https://gh.example.com/"))
    gateway = await gateways.create(store, operator, GatewaySpec(slug, servers=(GatewayServerSpec("github", "gh"),)))
    return gateway.id


def _member(operator: Actor, *capabilities: Capability) -> Actor:
    return Actor(operator.workspace_id, MemberId(new_id()), frozenset(capabilities), "test member")


async def test_policy_rules_are_created_read_listed_and_deleted_with_their_gateway_named_by_slug(
    store: Store, operator: Actor
) -> None:
    gateway_id = await _gateway(store, operator)
    made = await rules.create_policy(
        store,
        operator,
        effect=Effect.DENY,
        subject_kind=SubjectKind.MEMBER,
        subject=" ada@example.com ",
        gateway="sales",
        server="gh",
        name="drop_*",
        description="no drops",
    )
    assert made.rule.gateway_id == gateway_id and made.gateway_slug == "sales"
    assert (made.rule.subject, made.rule.server, made.rule.name) == ("ada@example.com", "gh", "drop_*")
    everywhere = await rules.create_policy(store, operator, effect=Effect.ALLOW, gateway=gateway_id)
    assert everywhere.rule.subject_kind is SubjectKind.ANY and everywhere.gateway_slug == "sales"

    assert await rules.get_policy(store, operator, made.rule.id) == made
    page = await rules.list_policies(store, operator, limit=1)
    assert [p.rule.id for p in page.items] == [made.rule.id] and page.next_cursor is not None
    rest = await rules.list_policies(store, operator, cursor=page.next_cursor)
    assert [p.rule.id for p in rest.items] == [everywhere.rule.id] and rest.next_cursor is None

    await rules.delete_policy(store, operator, made.rule.id)
    with pytest.raises(NotFound):
        await rules.get_policy(store, operator, made.rule.id)
    with pytest.raises(NotFound):
        await rules.delete_policy(store, operator, made.rule.id)


async def test_a_rule_for_a_gateway_that_does_not_exist_is_not_found_naming_the_gateway(
    store: Store, operator: Actor
) -> None:
    attempts = (
        rules.create_policy(store, operator, effect=Effect.DENY, gateway="nowhere"),
        rules.create_content_rule(
            store, operator, name="keys", pattern="sk-[a-z]+", action=ContentAction.BLOCK, gateway="nowhere"
        ),
        rules.create_rate_limit(store, operator, per=LimitPer.MEMBER, limit="1/second", gateway="nowhere"),
    )
    for attempt in attempts:
        with pytest.raises(NotFound, match="no gateway with id or slug 'nowhere'") as caught:
            await attempt
        assert caught.value.field == "gateway"
    assert (await rules.list_policies(store, operator)).items == []


async def test_a_policy_rule_naming_a_server_alias_the_gateway_lacks_is_refused_with_the_aliases_it_has(
    store: Store, operator: Actor
) -> None:
    await _gateway(store, operator)
    with pytest.raises(NotFound, match=r"no server with alias 'github' \(its aliases: gh\)") as caught:
        await rules.create_policy(store, operator, effect=Effect.DENY, gateway="sales", server="github")
    assert caught.value.field == "server"
    # Without a gateway the alias means "that alias in every gateway", so it cannot be checked.
    await rules.create_policy(store, operator, effect=Effect.DENY, server="github")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"subject_kind": SubjectKind.MEMBER}, "subject"),
        ({"subject": "ada@example.com"}, "subject"),
        ({"description": "d" * 501}, "description"),
    ],
)
async def test_an_invalid_policy_rule_is_refused_naming_the_field_and_nothing_is_stored(
    store: Store, operator: Actor, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await rules.create_policy(store, operator, effect=Effect.DENY, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert (await rules.list_policies(store, operator)).items == []


async def test_content_rules_are_found_by_name_edited_switched_off_and_deleted(store: Store, operator: Actor) -> None:
    await _gateway(store, operator)
    made = await rules.create_content_rule(
        store, operator, name="cards", pattern=r"\d{16}", action=ContentAction.MASK, gateway="sales"
    )
    assert (made.rule.target, made.rule.enabled, made.gateway_slug) == (ContentTarget.BOTH, True, "sales")
    assert await rules.get_content_rule(store, operator, "cards") == made

    replaced = await rules.update_content_rule(
        store, operator, "cards", {"action": ContentAction.REPLACE, "replacement": "<card>"}
    )
    assert (replaced.rule.action, replaced.rule.replacement, replaced.rule.pattern) == ("replace", "<card>", r"\d{16}")
    # Leaving replace drops the replacement rather than refusing the edit for keeping it.
    hashed = await rules.update_content_rule(store, operator, made.rule.id, {"action": ContentAction.HASH})
    assert (hashed.rule.action, hashed.rule.replacement) == (ContentAction.HASH, None)

    off = await rules.set_content_rule_enabled(store, operator, "cards", False)
    assert off.rule.enabled is False and off.rule.id == made.rule.id
    assert (await rules.set_content_rule_enabled(store, operator, "cards", True)).rule.enabled is True

    await rules.delete_content_rule(store, operator, "cards")
    with pytest.raises(NotFound):
        await rules.get_content_rule(store, operator, made.rule.id)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pattern": "([a-z"}, "pattern"),
        ({"pattern": "a*"}, "pattern"),
        ({"action": ContentAction.REPLACE}, "replacement"),
        ({"replacement": "x"}, "replacement"),
        ({"name": "Not A Slug"}, "name"),
    ],
)
async def test_an_invalid_content_rule_is_refused_naming_the_field(
    store: Store, operator: Actor, kwargs: dict[str, object], field: str
) -> None:
    values: dict[str, object] = {"name": "secrets", "pattern": "sk-[A-Za-z0-9]+", "action": ContentAction.REDACT}
    with pytest.raises(ValidationFailed) as caught:
        await rules.create_content_rule(store, operator, **(values | kwargs))  # type: ignore[arg-type]
    assert caught.value.field == field
    assert (await rules.list_content_rules(store, operator)).items == []


async def test_a_content_rule_edit_is_validated_as_a_whole_and_names_must_stay_unique(
    store: Store, operator: Actor
) -> None:
    await rules.create_content_rule(store, operator, name="keys", pattern="sk-[a-z]+", action=ContentAction.BLOCK)
    with pytest.raises(Conflict):
        await rules.create_content_rule(store, operator, name="keys", pattern="x+", action=ContentAction.BLOCK)
    with pytest.raises(ValidationFailed, match="not a valid regular expression") as caught:
        await rules.update_content_rule(store, operator, "keys", {"pattern": "(unclosed"})
    assert caught.value.field == "pattern"
    with pytest.raises(ValidationFailed) as caught:
        await rules.update_content_rule(store, operator, "keys", {"action": ContentAction.REPLACE})
    assert caught.value.field == "replacement"
    with pytest.raises(ValidationFailed) as caught:
        await rules.update_content_rule(store, operator, "keys", {"name": "renamed"})
    assert caught.value.field == "name"
    assert (await rules.get_content_rule(store, operator, "keys")).rule.pattern == "sk-[a-z]+"


async def test_rate_limits_take_a_limit_text_or_an_amount_and_window(store: Store, operator: Actor) -> None:
    gateway_id = await _gateway(store, operator)
    by_text = await rules.create_rate_limit(
        store, operator, per=LimitPer.MEMBER, limit="100/minute", strategy=Strategy.SLIDING, gateway="sales"
    )
    assert (by_text.rule.amount, by_text.rule.window_s, by_text.rule.strategy) == (100, 60, Strategy.SLIDING)
    assert (by_text.rule.gateway_id, by_text.gateway_slug) == (gateway_id, "sales")
    by_numbers = await rules.create_rate_limit(
        store, operator, per=LimitPer.TOOL, amount=5, window_s=30, name="gh__delete_*"
    )
    assert (by_numbers.rule.amount, by_numbers.rule.window_s, by_numbers.rule.name) == (5, 30, "gh__delete_*")
    assert by_numbers.gateway_slug is None and by_numbers.rule.strategy is Strategy.FIXED

    assert await rules.get_rate_limit(store, operator, by_text.rule.id) == by_text
    assert [r.rule.id for r in (await rules.list_rate_limits(store, operator)).items] == [
        by_text.rule.id,
        by_numbers.rule.id,
    ]
    await rules.delete_rate_limit(store, operator, by_text.rule.id)
    with pytest.raises(NotFound):
        await rules.get_rate_limit(store, operator, by_text.rule.id)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": "lots/minute"}, "limit"),
        ({"limit": "0/minute"}, "limit"),
        ({"limit": "10/minute", "amount": 10}, "limit"),
        ({"amount": 10}, "limit"),
        ({}, "limit"),
        ({"amount": 0, "window_s": 60}, "amount"),
        ({"amount": 1, "window_s": 86_401}, "window_s"),
        ({"limit": "1/second", "name": ""}, "name"),
    ],
)
async def test_an_invalid_rate_limit_is_refused_naming_the_field(
    store: Store, operator: Actor, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await rules.create_rate_limit(store, operator, per=LimitPer.HOST, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert (await rules.list_rate_limits(store, operator)).items == []


async def test_viewers_may_read_rules_but_only_policies_manage_may_change_them(store: Store, operator: Actor) -> None:
    policy = await rules.create_policy(store, operator, effect=Effect.DENY)
    content = await rules.create_content_rule(store, operator, name="k", pattern="k+", action=ContentAction.BLOCK)
    limit = await rules.create_rate_limit(store, operator, per=LimitPer.MEMBER, limit="1/second")

    viewer = _member(operator, Capability.ADMIN_VIEW)
    assert (await rules.get_policy(store, viewer, policy.rule.id)).rule == policy.rule
    assert len((await rules.list_content_rules(store, viewer)).items) == 1
    assert (await rules.get_rate_limit(store, viewer, limit.rule.id)).rule == limit.rule

    outsider = _member(operator, Capability.HOSTS_MANAGE)
    for read in (
        rules.list_policies(store, outsider),
        rules.get_content_rule(store, outsider, "k"),
        rules.list_rate_limits(store, outsider),
    ):
        with pytest.raises(Forbidden):
            await read
    for change in (
        rules.create_policy(store, viewer, effect=Effect.ALLOW),
        rules.delete_policy(store, viewer, policy.rule.id),
        rules.create_content_rule(store, viewer, name="x", pattern="x+", action=ContentAction.BLOCK),
        rules.update_content_rule(store, viewer, "k", {"pattern": "kk+"}),
        rules.set_content_rule_enabled(store, viewer, "k", False),
        rules.delete_content_rule(store, viewer, content.rule.id),
        rules.create_rate_limit(store, viewer, per=LimitPer.HOST, limit="1/second"),
        rules.delete_rate_limit(store, viewer, limit.rule.id),
    ):
        with pytest.raises(Forbidden, match=r"policies\.manage"):
            await change
    manager = _member(operator, Capability.POLICIES_MANAGE)
    await rules.delete_policy(store, manager, policy.rule.id)
    made = await rules.create_policy(store, manager, effect=Effect.ALLOW)
    assert [p.rule.id for p in (await rules.list_policies(store, manager)).items] == [made.rule.id]
    assert (made.created_by, policy.created_by) == (manager.member_id, None)


async def test_every_change_announces_the_workspace_policy_and_a_refused_one_announces_nothing(
    store: Store, operator: Actor
) -> None:
    seen: list[Changed] = []
    store.bus.subscribe(seen.append)
    expected = Changed(Subject.POLICY, operator.workspace_id)

    policy = await rules.create_policy(store, operator, effect=Effect.DENY)
    await rules.delete_policy(store, operator, policy.rule.id)
    await rules.create_content_rule(store, operator, name="k", pattern="k+", action=ContentAction.BLOCK)
    await rules.update_content_rule(store, operator, "k", {"target": ContentTarget.RESULTS})
    await rules.set_content_rule_enabled(store, operator, "k", False)
    await rules.delete_content_rule(store, operator, "k")
    limit = await rules.create_rate_limit(store, operator, per=LimitPer.MEMBER, limit="1/second")
    await rules.delete_rate_limit(store, operator, limit.rule.id)
    assert [e for e in seen if e.subject is Subject.POLICY] == [expected] * 8

    seen.clear()
    with pytest.raises(ValidationFailed):
        await rules.create_content_rule(store, operator, name="bad", pattern="(", action=ContentAction.BLOCK)
    with pytest.raises(NotFound):
        await rules.delete_rate_limit(store, operator, limit.rule.id)
    await rules.list_policies(store, operator)
    assert seen == []


async def test_load_returns_exactly_the_enabled_rules_of_that_workspace_in_creation_order(
    store: Store, operator: Actor
) -> None:
    other_id = new_id()
    async with store.transaction() as conn:
        await conn.execute(schema.workspaces.insert().values(id=other_id, name="Other", created_at=datetime.now(UTC)))
    other = Actor.local_operator(WorkspaceId(other_id))
    await rules.create_policy(store, other, effect=Effect.DENY)
    await rules.create_content_rule(store, other, name="k", pattern="k+", action=ContentAction.BLOCK)
    await rules.create_rate_limit(store, other, per=LimitPer.MEMBER, limit="1/second")

    assert await rules.load(store, operator.workspace_id) == rules.RuleSet((), (), ())
    deny = await rules.create_policy(store, operator, effect=Effect.DENY, subject_kind=SubjectKind.ROLE, subject="x")
    allow = await rules.create_policy(store, operator, effect=Effect.ALLOW)
    first = await rules.create_content_rule(store, operator, name="a", pattern="a+", action=ContentAction.REDACT)
    await rules.create_content_rule(store, operator, name="b", pattern="b+", action=ContentAction.REDACT)
    third = await rules.create_content_rule(store, operator, name="c", pattern="c+", action=ContentAction.REDACT)
    await rules.set_content_rule_enabled(store, operator, "b", False)
    limit = await rules.create_rate_limit(store, operator, per=LimitPer.HOST, amount=3, window_s=10)

    loaded = await rules.load(store, operator.workspace_id)
    assert loaded == rules.RuleSet((deny.rule, allow.rule), (first.rule, third.rule), (limit.rule,))
    assert [r.name for r in (await rules.load(store, other.workspace_id)).content] == ["k"]


async def test_every_rule_change_is_one_audit_event_naming_fields_but_never_the_pattern(
    store: Store, operator: Actor
) -> None:
    policy = await rules.create_policy(store, operator, effect=Effect.DENY, description="block all")
    content = await rules.create_content_rule(
        store, operator, name="keys", pattern=r"sk-canary-[a-z]+", action=ContentAction.REDACT
    )
    await rules.set_content_rule_enabled(store, operator, "keys", False)
    await rules.update_content_rule(store, operator, "keys", {"action": ContentAction.MASK})
    limit = await rules.create_rate_limit(store, operator, per=LimitPer.MEMBER, limit="5/minute")
    await rules.delete_policy(store, operator, policy.rule.id)
    await rules.delete_rate_limit(store, operator, limit.rule.id)
    await rules.delete_content_rule(store, operator, "keys")
    async with store.transaction() as conn:
        query = sa.select(schema.audit_events).where(schema.audit_events.c.kind == "admin")
        events = (await conn.execute(query.order_by(schema.audit_events.c.seq))).all()
    assert [(e.method, e.target) for e in events] == [
        ("policy.created", f"policy:{policy.rule.id}"),
        ("content_rule.created", f"content_rule:{content.rule.id}"),
        ("content_rule.disabled", f"content_rule:{content.rule.id}"),
        ("content_rule.updated", f"content_rule:{content.rule.id}"),
        ("rate_limit.created", f"rate_limit:{limit.rule.id}"),
        ("policy.deleted", f"policy:{policy.rule.id}"),
        ("rate_limit.deleted", f"rate_limit:{limit.rule.id}"),
        ("content_rule.deleted", f"content_rule:{content.rule.id}"),
    ]
    assert events[3].detail == {"name": "keys", "fields": ["action"]}
    assert all("sk-canary" not in str(tuple(e)) for e in events)
