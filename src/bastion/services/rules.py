"""Workspace rules the data plane enforces: policy rules, content rules and rate limits.

Policy rules and rate limits are immutable (create, then delete); content rules can also be edited and switched off.
Every change emits ``Changed(Subject.POLICY, workspace_id)`` so each replica reloads its ``RuleSet``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.content import ContentAction, ContentRule, ContentTarget
from bastion.domain.ids import new_id
from bastion.domain.models import Gateway
from bastion.domain.policy import Effect, PolicyRule, SubjectKind, summary
from bastion.domain.ratelimits import LimitPer, RateLimitRule, Strategy, describe, parse_limit
from bastion.domain.specs import validated_change
from bastion.errors import Conflict, NotFound, ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.services import gateways
from bastion.services.actions import action as record_action
from bastion.types import JSONObject, JSONValue

P = schema.policy_rules
C = schema.content_rules
L = schema.rate_limits
_KINDS: Final = {P.name: "policy", C.name: "content_rule", L.name: "rate_limit"}  # audit action prefixes
R = TypeVar("R")
_READ: Final = (Capability.POLICIES_MANAGE, Capability.ADMIN_VIEW)
CONTENT_EDITABLE: Final = frozenset({"pattern", "action", "target", "replacement", "enabled"})


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything the data plane enforces for one workspace (enabled content rules only)."""

    policies: tuple[PolicyRule, ...]
    content: tuple[ContentRule, ...]
    limits: tuple[RateLimitRule, ...]


@dataclass(frozen=True, slots=True)
class Stored(Generic[R]):
    """A rule as an admin sees it: the rule, its gateway's slug, who made it and when."""

    rule: R
    gateway_slug: str | None
    created_by: str | None
    created_at: datetime


# --- rows -----------------------------------------------------------------------------------------------------------


def policy_of(row: sa.Row[Any]) -> PolicyRule:
    return PolicyRule(
        id=row.id,
        effect=Effect(row.effect),
        subject_kind=SubjectKind(row.subject_kind),
        subject=row.subject,
        gateway_id=row.gateway_id,
        server=row.server,
        name=row.name,
        description=row.description,
    )


def content_of(row: sa.Row[Any]) -> ContentRule:
    return ContentRule(
        id=row.id,
        name=row.name,
        pattern=row.pattern,
        action=ContentAction(row.action),
        target=ContentTarget(row.target),
        replacement=row.replacement,
        gateway_id=row.gateway_id,
        enabled=row.enabled,
    )


def limit_of(row: sa.Row[Any]) -> RateLimitRule:
    return RateLimitRule(
        id=row.id,
        per=LimitPer(row.per),
        amount=row.amount,
        window_s=row.window_s,
        strategy=Strategy(row.strategy),
        gateway_id=row.gateway_id,
        name=row.name,
    )


async def _slugs(conn: AsyncConnection, gateway_ids: Iterable[str | None]) -> dict[str, str]:
    wanted = {g for g in gateway_ids if g is not None}
    if not wanted:
        return {}
    G = schema.gateways
    return {r.id: r.slug for r in await conn.execute(sa.select(G.c.id, G.c.slug).where(G.c.id.in_(wanted)))}


Convert = Callable[[sa.Row[Any]], R]


async def _stored(conn: AsyncConnection, found: Sequence[sa.Row[Any]], convert: Convert[R]) -> list[Stored[R]]:
    slugs = await _slugs(conn, (r.gateway_id for r in found))
    return [Stored(convert(r), slugs.get(r.gateway_id or ""), r.created_by, r.created_at) for r in found]


async def _gateway(conn: AsyncConnection, workspace_id: str, ref: str | None) -> Gateway | None:
    """The gateway named by id or slug; NotFound names the field for an unknown one."""
    if ref is None:
        return None
    try:
        return await gateways.find(conn, workspace_id, ref)
    except NotFound:
        raise NotFound(f"no gateway with id or slug {ref!r}", field="gateway") from None


def _common(actor: Actor, gateway: Gateway | None) -> dict[str, Any]:
    return {
        "workspace_id": actor.workspace_id,
        "gateway_id": gateway.id if gateway else None,
        "created_by": actor.member_id,
        "created_at": datetime.now(UTC),
    }


async def _fetch(conn: AsyncConnection, table: sa.Table, workspace_id: str, ref: str, what: str) -> sa.Row[Any]:
    # Content rules have unique names, so people may name them; the other rules are known by id only.
    where = sa.or_(table.c.id == ref, table.c.name == ref) if table is C else table.c.id == ref
    return await crud.fetch_one(conn, table, table.c.workspace_id == workspace_id, where, what=what)


async def _one(
    conn: AsyncConnection, table: sa.Table, convert: Convert[R], workspace_id: str, ref: str, what: str
) -> Stored[R]:
    (item,) = await _stored(conn, [await _fetch(conn, table, workspace_id, ref, what)], convert)
    return item


async def _page(
    store: Store, actor: Actor, table: sa.Table, convert: Convert[R], cursor: str | None, limit: int | None
) -> Page[Stored[R]]:
    actor.require_any(*_READ)
    async with store.transaction() as conn:
        found, next_cursor = await crud.page(
            conn, table, [table.c.workspace_id == actor.workspace_id], cursor=cursor, limit=limit
        )
        return Page(await _stored(conn, found, convert), next_cursor)


async def _get(store: Store, actor: Actor, table: sa.Table, convert: Convert[R], ref: str, what: str) -> Stored[R]:
    actor.require_any(*_READ)
    async with store.transaction() as conn:
        return await _one(conn, table, convert, actor.workspace_id, ref, what)


async def _delete(store: Store, actor: Actor, table: sa.Table, ref: str, what: str) -> None:
    actor.require(Capability.POLICIES_MANAGE)
    async with store.transaction() as conn:
        row = await _fetch(conn, table, actor.workspace_id, ref, what)
        emit(conn, Changed(Subject.POLICY, actor.workspace_id))
        await crud.delete(conn, table, row.id, what=what)
        kind = _KINDS[table.name]
        record_action(conn, actor, f"{kind}.deleted", f"{kind}:{row.id}")


# --- policy rules ---------------------------------------------------------------------------------------------------


async def create_policy(
    store: Store,
    actor: Actor,
    *,
    effect: Effect,
    subject_kind: SubjectKind = SubjectKind.ANY,
    subject: str | None = None,
    gateway: str | None = None,
    server: str | None = None,
    name: str | None = None,
    description: str = "",
) -> Stored[PolicyRule]:
    """Add a policy rule. ``gateway`` is an id or slug; with one, ``server`` must be one of its aliases."""
    actor.require(Capability.POLICIES_MANAGE)
    rule = PolicyRule(new_id(), effect, subject_kind, subject, None, server, name, description).validated()
    async with store.transaction() as conn:
        found = await _gateway(conn, actor.workspace_id, gateway)
        if found is not None and rule.server is not None:
            aliases = sorted(s.alias for s in found.servers)
            if rule.server not in aliases:
                offered = ", ".join(aliases) or "none"
                raise NotFound(
                    f"gateway {found.slug!r} has no server with alias {rule.server!r} (its aliases: {offered})",
                    field="server",
                )
        values = {
            "id": rule.id,
            "effect": rule.effect.value,
            "subject_kind": rule.subject_kind.value,
            "subject": rule.subject,
            "server": rule.server,
            "name": rule.name,
            "description": rule.description,
        }
        await crud.insert(conn, P, values | _common(actor, found), what="policy rule", unique_field="id")
        emit(conn, Changed(Subject.POLICY, actor.workspace_id))
        record_action(conn, actor, "policy.created", f"policy:{rule.id}", {"summary": summary(rule)})
        return await _one(conn, P, policy_of, actor.workspace_id, rule.id, "policy rule")


async def list_policies(
    store: Store, actor: Actor, *, cursor: str | None = None, limit: int | None = None
) -> Page[Stored[PolicyRule]]:
    return await _page(store, actor, P, policy_of, cursor, limit)


async def get_policy(store: Store, actor: Actor, rule_id: str) -> Stored[PolicyRule]:
    return await _get(store, actor, P, policy_of, rule_id, "policy rule")


async def delete_policy(store: Store, actor: Actor, rule_id: str) -> None:
    await _delete(store, actor, P, rule_id, "policy rule")


# --- content rules --------------------------------------------------------------------------------------------------


def _content_values(rule: ContentRule) -> dict[str, Any]:
    return {
        "pattern": rule.pattern,
        "action": rule.action.value,
        "target": rule.target.value,
        "replacement": rule.replacement,
        "enabled": rule.enabled,
    }


async def create_content_rule(
    store: Store,
    actor: Actor,
    *,
    name: str,
    pattern: str,
    action: ContentAction,
    target: ContentTarget = ContentTarget.BOTH,
    replacement: str | None = None,
    gateway: str | None = None,
    enabled: bool = True,
) -> Stored[ContentRule]:
    """Add a content rule; its ``name`` is unique in the workspace. ``gateway`` is an id or slug."""
    actor.require(Capability.POLICIES_MANAGE)
    rule = ContentRule(new_id(), name, pattern, action, target, replacement, None, enabled).validated()
    async with store.transaction() as conn:
        found = await _gateway(conn, actor.workspace_id, gateway)
        values = {"id": rule.id, "name": rule.name, **_content_values(rule)}
        await crud.insert(conn, C, values | _common(actor, found), what="content rule", unique_field="name")
        emit(conn, Changed(Subject.POLICY, actor.workspace_id))
        detail: JSONObject = {"name": rule.name, "action": rule.action.value, "target": rule.target.value}
        record_action(conn, actor, "content_rule.created", f"content_rule:{rule.id}", detail)
        return await _one(conn, C, content_of, actor.workspace_id, rule.id, "content rule")


async def list_content_rules(
    store: Store, actor: Actor, *, cursor: str | None = None, limit: int | None = None
) -> Page[Stored[ContentRule]]:
    return await _page(store, actor, C, content_of, cursor, limit)


async def get_content_rule(store: Store, actor: Actor, ref: str) -> Stored[ContentRule]:
    """A content rule by id or name."""
    return await _get(store, actor, C, content_of, ref, "content rule")


async def update_content_rule(store: Store, actor: Actor, ref: str, changes: Mapping[str, Any]) -> Stored[ContentRule]:
    """Change any of pattern, action, target, replacement and enabled; the result is validated as a whole."""
    actor.require(Capability.POLICIES_MANAGE)
    for key in changes:
        if key not in CONTENT_EDITABLE:
            raise ValidationFailed(f"a content rule's {key} cannot be changed", field=key)
    async with store.transaction() as conn:
        row = await _fetch(conn, C, actor.workspace_id, ref, "content rule")
        current = content_of(row)
        wanted = dict(changes)
        if "action" not in wanted and "replacement" in wanted:
            # Without an action, a replacement given to another rule, or taken from a replace rule, does not fit
            # the stored action.
            if wanted["replacement"] and current.action is not ContentAction.REPLACE:
                raise Conflict(
                    f"a {current.action} rule takes no replacement; set action to replace in the same edit",
                    field="replacement",
                )
            if not wanted["replacement"] and current.action is ContentAction.REPLACE:
                raise Conflict(
                    "a replace rule needs its replacement; set another action in the same edit", field="replacement"
                )
        if "action" in wanted:
            # The replacement goes with the action: moving off replace drops it rather than failing on it, and
            # moving to replace needs one in the same change.
            wanted.setdefault("replacement", current.replacement if wanted["action"] == ContentAction.REPLACE else None)
        rule = validated_change(current, wanted)
        emit(conn, Changed(Subject.POLICY, actor.workspace_id))
        await conn.execute(C.update().where(C.c.id == row.id).values(**_content_values(rule)))
        verb = "updated"
        if set(changes) == {"enabled"}:
            verb = "enabled" if rule.enabled else "disabled"
        # Field names only: a pattern or replacement may itself describe a secret's shape.
        fields: list[JSONValue] = [*sorted(changes)]
        detail: JSONObject = {"name": rule.name, "fields": fields}
        record_action(conn, actor, f"content_rule.{verb}", f"content_rule:{row.id}", detail)
        return await _one(conn, C, content_of, actor.workspace_id, row.id, "content rule")


async def set_content_rule_enabled(store: Store, actor: Actor, ref: str, enabled: bool) -> Stored[ContentRule]:
    return await update_content_rule(store, actor, ref, {"enabled": enabled})


async def delete_content_rule(store: Store, actor: Actor, ref: str) -> None:
    await _delete(store, actor, C, ref, "content rule")


# --- rate limits ----------------------------------------------------------------------------------------------------


def _amount_and_window(limit: str | None, amount: int | None, window_s: int | None) -> tuple[int, int]:
    if limit is not None:
        if amount is not None or window_s is not None:
            raise ValidationFailed("give either limit or amount and window_s, not both", field="limit")
        return parse_limit(limit)
    if amount is None or window_s is None:
        raise ValidationFailed('give a limit such as "100/minute", or both amount and window_s', field="limit")
    return amount, window_s


async def create_rate_limit(
    store: Store,
    actor: Actor,
    *,
    per: LimitPer,
    limit: str | None = None,
    amount: int | None = None,
    window_s: int | None = None,
    strategy: Strategy = Strategy.FIXED,
    gateway: str | None = None,
    name: str | None = None,
) -> Stored[RateLimitRule]:
    """Add a rate limit, given as ``limit`` ("100/minute") or as ``amount`` calls per ``window_s`` seconds."""
    actor.require(Capability.POLICIES_MANAGE)
    calls, seconds = _amount_and_window(limit, amount, window_s)
    rule = RateLimitRule(new_id(), per, calls, seconds, strategy, None, name).validated()
    async with store.transaction() as conn:
        found = await _gateway(conn, actor.workspace_id, gateway)
        values = {
            "id": rule.id,
            "per": rule.per.value,
            "name": rule.name,
            "amount": rule.amount,
            "window_s": rule.window_s,
            "strategy": rule.strategy.value,
        }
        await crud.insert(conn, L, values | _common(actor, found), what="rate limit", unique_field="id")
        emit(conn, Changed(Subject.POLICY, actor.workspace_id))
        record_action(conn, actor, "rate_limit.created", f"rate_limit:{rule.id}", {"summary": describe(rule)})
        return await _one(conn, L, limit_of, actor.workspace_id, rule.id, "rate limit")


async def list_rate_limits(
    store: Store, actor: Actor, *, cursor: str | None = None, limit: int | None = None
) -> Page[Stored[RateLimitRule]]:
    return await _page(store, actor, L, limit_of, cursor, limit)


async def get_rate_limit(store: Store, actor: Actor, rule_id: str) -> Stored[RateLimitRule]:
    return await _get(store, actor, L, limit_of, rule_id, "rate limit")


async def delete_rate_limit(store: Store, actor: Actor, rule_id: str) -> None:
    await _delete(store, actor, L, rule_id, "rate limit")


# --- the data plane's read ------------------------------------------------------------------------------------------


async def load(store: Store, workspace_id: str) -> RuleSet:
    """Every rule the data plane enforces for ``workspace_id``, in creation order. A system read: no actor."""
    async with store.transaction() as conn:

        async def rows(table: sa.Table, *where: sa.ColumnElement[bool]) -> list[sa.Row[Any]]:
            query = sa.select(table).where(table.c.workspace_id == workspace_id, *where).order_by(table.c.id)
            return list((await conn.execute(query)).all())

        return RuleSet(
            policies=tuple(policy_of(r) for r in await rows(P)),
            content=tuple(content_of(r) for r in await rows(C, C.c.enabled.is_(sa.true()))),
            limits=tuple(limit_of(r) for r in await rows(L)),
        )
