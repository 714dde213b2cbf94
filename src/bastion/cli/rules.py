"""`bastion policy …`, `bastion content-rule …`, `bastion rate-limit …`: the rules the gateways enforce."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import emit_json, emit_many, emit_one, success
from bastion.domain.content import ContentAction, ContentRule, ContentTarget
from bastion.domain.policy import Effect, PolicyRule, SubjectKind
from bastion.domain.ratelimits import LimitPer, RateLimitRule, Strategy
from bastion.errors import ValidationFailed
from bastion.services import rules
from bastion.services.rules import Stored
from bastion.web.api.schemas_rules import ContentRuleOut, PolicyOut, RateLimitOut

policy_app = typer.Typer(no_args_is_help=True, add_completion=False)
content_rule_app = typer.Typer(no_args_is_help=True, add_completion=False)
rate_limit_app = typer.Typer(no_args_is_help=True, add_completion=False)

POLICY_COLUMNS = ("id", "summary", "description")
CONTENT_COLUMNS = ("name", "enabled", "action", "target", "pattern", "gateway", "id")
LIMIT_COLUMNS = ("id", "per", "limit", "strategy", "name", "gateway")
RuleId = Annotated[str, typer.Argument(help="The rule's id (from `list`).")]
ContentRef = Annotated[str, typer.Argument(help="Content rule name or id.")]
Gateway = Annotated[str | None, typer.Option(help="Gateway slug or id (default: every gateway).")]


def _removed(remove: Callable[[CliContext], Awaitable[dict[str, Any]]], json_out: bool, what: str) -> None:
    doc = run_with(remove)
    if json_out:
        emit_json({"deleted": True, **doc})
    else:
        success(f"removed {what} {doc.get('name') or doc['id']}")


# --- policy rules ---------------------------------------------------------------------------------------------------


def policy_record(item: Stored[PolicyRule]) -> dict[str, Any]:
    return PolicyOut.of(item).model_dump(mode="json")


@policy_app.command("add")
def policy_add(
    effect: Annotated[Effect, typer.Option(help="allow or deny. Deny wins over any allow.")],
    subject_kind: Annotated[SubjectKind, typer.Option(help="Who the rule is about.")] = SubjectKind.ANY,
    subject: Annotated[
        str | None, typer.Option(help="Member id or email, role name, or host id or name (not with `any`).")
    ] = None,
    gateway: Gateway = None,
    server: Annotated[str | None, typer.Option(help="A server's alias in the gateway (default: every server).")] = None,
    name: Annotated[
        str | None, typer.Option(help="Tool, prompt or resource name, or a pattern like 'delete_*' (default: all).")
    ] = None,
    description: Annotated[str, typer.Option(help="Why the rule exists; shown when it refuses a call.")] = "",
    json_out: JsonFlag = False,
) -> None:
    """Add a policy rule. Rules cannot be edited: remove one and add another."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        item = await rules.create_policy(
            ctx.store,
            ctx.actor,
            effect=effect,
            subject_kind=subject_kind,
            subject=subject,
            gateway=gateway,
            server=server,
            name=name,
            description=description,
        )
        return policy_record(item)

    doc = run_with(body)
    emit_one(doc, json_out, message=f"added policy rule {doc['id']}: {doc['summary']}")


@policy_app.command("list")
def policy_list(json_out: JsonFlag = False) -> None:
    """List policy rules, oldest first."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: rules.list_policies(ctx.store, ctx.actor, cursor=c, limit=n))
        return [policy_record(p) for p in found]

    emit_many(run_with(body), json_out, POLICY_COLUMNS, title="Policy rules")


@policy_app.command("show")
def policy_show(rule_id: RuleId, json_out: JsonFlag = False) -> None:
    """Show one policy rule."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return policy_record(await rules.get_policy(ctx.store, ctx.actor, rule_id))

    emit_one(run_with(body), json_out)


@policy_app.command("remove")
def policy_remove(rule_id: RuleId, json_out: JsonFlag = False) -> None:
    """Remove a policy rule."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        await rules.delete_policy(ctx.store, ctx.actor, rule_id)
        return {"id": rule_id}

    _removed(body, json_out, "policy rule")


# --- content rules --------------------------------------------------------------------------------------------------


def content_record(item: Stored[ContentRule]) -> dict[str, Any]:
    return ContentRuleOut.of(item).model_dump(mode="json")


@content_rule_app.command("add")
def content_add(
    name: Annotated[str, typer.Argument(help="Slug-like name, e.g. card-numbers.")],
    pattern: Annotated[str, typer.Option(help="A regular expression (Python syntax); quote it for the shell.")],
    action: Annotated[ContentAction, typer.Option(help="What to do with a match.")],
    target: Annotated[ContentTarget, typer.Option(help="Scan call arguments, results or both.")] = ContentTarget.BOTH,
    replacement: Annotated[str | None, typer.Option(help="Literal text for --action replace.")] = None,
    gateway: Gateway = None,
    json_out: JsonFlag = False,
) -> None:
    """Add a content rule. It applies at once."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        item = await rules.create_content_rule(
            ctx.store,
            ctx.actor,
            name=name,
            pattern=pattern,
            action=action,
            target=target,
            replacement=replacement,
            gateway=gateway,
        )
        return content_record(item)

    doc = run_with(body)
    emit_one(doc, json_out, message=f"added content rule {doc['name']}: {doc['summary']}")


@content_rule_app.command("list")
def content_list(json_out: JsonFlag = False) -> None:
    """List content rules in the order they run."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: rules.list_content_rules(ctx.store, ctx.actor, cursor=c, limit=n))
        return [content_record(r) for r in found]

    emit_many(run_with(body), json_out, CONTENT_COLUMNS, title="Content rules")


@content_rule_app.command("show")
def content_show(ref: ContentRef, json_out: JsonFlag = False) -> None:
    """Show one content rule."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return content_record(await rules.get_content_rule(ctx.store, ctx.actor, ref))

    emit_one(run_with(body), json_out)


@content_rule_app.command("update")
def content_update(
    ref: ContentRef,
    pattern: Annotated[str | None, typer.Option(help="New regular expression.")] = None,
    action: Annotated[ContentAction | None, typer.Option(help="New action.")] = None,
    target: Annotated[ContentTarget | None, typer.Option(help="New target.")] = None,
    replacement: Annotated[str | None, typer.Option(help="New replacement text (for --action replace).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only the options given."""
    given = {"pattern": pattern, "action": action, "target": target, "replacement": replacement}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}

    async def body(ctx: CliContext) -> dict[str, Any]:
        if not changes:
            raise ValidationFailed("nothing to update: give --pattern, --action, --target or --replacement")
        return content_record(await rules.update_content_rule(ctx.store, ctx.actor, ref, changes))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated content rule {doc['name']}: {doc['summary']}")


def _toggle(ref: str, enabled: bool, json_out: bool) -> None:
    async def body(ctx: CliContext) -> dict[str, Any]:
        return content_record(await rules.set_content_rule_enabled(ctx.store, ctx.actor, ref, enabled))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"content rule {doc['name']} {'enabled' if enabled else 'disabled'}")


@content_rule_app.command("enable")
def content_enable(ref: ContentRef, json_out: JsonFlag = False) -> None:
    """Apply a content rule again."""
    _toggle(ref, True, json_out)


@content_rule_app.command("disable")
def content_disable(ref: ContentRef, json_out: JsonFlag = False) -> None:
    """Stop applying a content rule, keeping it."""
    _toggle(ref, False, json_out)


@content_rule_app.command("remove")
def content_remove(ref: ContentRef, json_out: JsonFlag = False) -> None:
    """Remove a content rule. To stop it for now and keep it, use `content-rule disable`."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        rule = (await rules.get_content_rule(ctx.store, ctx.actor, ref)).rule
        await rules.delete_content_rule(ctx.store, ctx.actor, rule.id)
        return {"id": rule.id, "name": rule.name}

    _removed(body, json_out, "content rule")


# --- rate limits ----------------------------------------------------------------------------------------------------


def limit_record(item: Stored[RateLimitRule]) -> dict[str, Any]:
    return RateLimitOut.of(item).model_dump(mode="json")


@rate_limit_app.command("add")
def limit_add(
    per: Annotated[LimitPer, typer.Option(help="Count calls per member, per host or per tool.")],
    limit: Annotated[str, typer.Option(help="Calls per window: 100/minute, 10/30s, 5000/1d.")],
    strategy: Annotated[Strategy, typer.Option(help="Fixed or sliding window.")] = Strategy.FIXED,
    gateway: Gateway = None,
    tool: Annotated[
        str | None, typer.Option(help="Namespaced tool name or a pattern like 'github__*' (default: every tool).")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Add a rate limit. Limits cannot be edited: remove one and add another."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        item = await rules.create_rate_limit(
            ctx.store, ctx.actor, per=per, limit=limit, strategy=strategy, gateway=gateway, name=tool
        )
        return limit_record(item)

    doc = run_with(body)
    emit_one(doc, json_out, message=f"added rate limit {doc['id']}: {doc['summary']}")


@rate_limit_app.command("list")
def limit_list(json_out: JsonFlag = False) -> None:
    """List rate limits."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: rules.list_rate_limits(ctx.store, ctx.actor, cursor=c, limit=n))
        return [limit_record(r) for r in found]

    emit_many(run_with(body), json_out, LIMIT_COLUMNS, title="Rate limits")


@rate_limit_app.command("show")
def limit_show(rule_id: RuleId, json_out: JsonFlag = False) -> None:
    """Show one rate limit."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return limit_record(await rules.get_rate_limit(ctx.store, ctx.actor, rule_id))

    emit_one(run_with(body), json_out)


@rate_limit_app.command("remove")
def limit_remove(rule_id: RuleId, json_out: JsonFlag = False) -> None:
    """Remove a rate limit."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        await rules.delete_rate_limit(ctx.store, ctx.actor, rule_id)
        return {"id": rule_id}

    _removed(body, json_out, "rate limit")
