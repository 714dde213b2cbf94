"""Rule routes: policy rules, content rules and rate limits of the workspace, which the data plane enforces."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Path, Request, Response

from bastion.domain.capabilities import Capability as C
from bastion.services import rules
from bastion.web.api.deps import Ctx, CurrentActor, Cursor, Limit, needs
from bastion.web.api.schemas import PageOut
from bastion.web.api.schemas_rules import (
    ContentRuleCreate,
    ContentRuleOut,
    ContentRuleUpdate,
    PolicyCreate,
    PolicyOut,
    RateLimitCreate,
    RateLimitOut,
)

router = APIRouter()
RuleId = Annotated[str, Path(min_length=1, max_length=64)]
Ref = Annotated[str, Path(min_length=1, max_length=64, description="id or name")]
_READ: Final = (C.POLICIES_MANAGE, C.ADMIN_VIEW)
_MANAGE: Final = needs(C.POLICIES_MANAGE)


def _created(response: Response, request: Request, object_id: str) -> None:
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{object_id}"


# --- policy rules ---------------------------------------------------------------------------------------------------


@router.get("/policies", tags=["policies"], openapi_extra=needs(*_READ))
async def list_policies(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None
) -> PageOut[PolicyOut]:
    page = await rules.list_policies(ctx.store, actor, cursor=cursor, limit=limit)
    return PageOut(items=[PolicyOut.of(p) for p in page.items], next_cursor=page.next_cursor)


@router.post("/policies", tags=["policies"], status_code=201, openapi_extra=_MANAGE)
async def create_policy(
    ctx: Ctx, actor: CurrentActor, body: PolicyCreate, request: Request, response: Response
) -> PolicyOut:
    """Allow or deny a subject a server's tools, prompts or resources. Deny wins. Rules cannot be edited."""
    item = await rules.create_policy(
        ctx.store,
        actor,
        effect=body.effect,
        subject_kind=body.subject_kind,
        subject=body.subject,
        gateway=body.gateway,
        server=body.server,
        name=body.name,
        description=body.description,
    )
    _created(response, request, item.rule.id)
    return PolicyOut.of(item)


@router.get("/policies/{rule_id}", tags=["policies"], openapi_extra=needs(*_READ))
async def get_policy(ctx: Ctx, actor: CurrentActor, rule_id: RuleId) -> PolicyOut:
    return PolicyOut.of(await rules.get_policy(ctx.store, actor, rule_id))


@router.delete(
    "/policies/{rule_id}", tags=["policies"], openapi_extra=_MANAGE, status_code=204, response_class=Response
)
async def delete_policy(ctx: Ctx, actor: CurrentActor, rule_id: RuleId) -> None:
    await rules.delete_policy(ctx.store, actor, rule_id)


# --- content rules --------------------------------------------------------------------------------------------------


@router.get("/content-rules", tags=["content rules"], openapi_extra=needs(*_READ))
async def list_content_rules(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None
) -> PageOut[ContentRuleOut]:
    page = await rules.list_content_rules(ctx.store, actor, cursor=cursor, limit=limit)
    return PageOut(items=[ContentRuleOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/content-rules", tags=["content rules"], status_code=201, openapi_extra=_MANAGE)
async def create_content_rule(
    ctx: Ctx, actor: CurrentActor, body: ContentRuleCreate, request: Request, response: Response
) -> ContentRuleOut:
    """Detect a pattern in tool-call arguments, results or both, and block, redact, mask, hash or replace it."""
    item = await rules.create_content_rule(
        ctx.store,
        actor,
        name=body.name,
        pattern=body.pattern,
        action=body.action,
        target=body.target,
        replacement=body.replacement,
        gateway=body.gateway,
        enabled=body.enabled,
    )
    _created(response, request, item.rule.id)
    return ContentRuleOut.of(item)


@router.get("/content-rules/{ref}", tags=["content rules"], openapi_extra=needs(*_READ))
async def get_content_rule(ctx: Ctx, actor: CurrentActor, ref: Ref) -> ContentRuleOut:
    return ContentRuleOut.of(await rules.get_content_rule(ctx.store, actor, ref))


@router.patch("/content-rules/{ref}", tags=["content rules"], openapi_extra=_MANAGE)
async def update_content_rule(ctx: Ctx, actor: CurrentActor, ref: Ref, body: ContentRuleUpdate) -> ContentRuleOut:
    """Change the pattern, action, target or replacement, or switch the rule off (`enabled: false`) and on."""
    return ContentRuleOut.of(await rules.update_content_rule(ctx.store, actor, ref, body.changes()))


@router.delete(
    "/content-rules/{ref}", tags=["content rules"], openapi_extra=_MANAGE, status_code=204, response_class=Response
)
async def delete_content_rule(ctx: Ctx, actor: CurrentActor, ref: Ref) -> None:
    await rules.delete_content_rule(ctx.store, actor, ref)


# --- rate limits ----------------------------------------------------------------------------------------------------


@router.get("/rate-limits", tags=["rate limits"], openapi_extra=needs(*_READ))
async def list_rate_limits(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None
) -> PageOut[RateLimitOut]:
    page = await rules.list_rate_limits(ctx.store, actor, cursor=cursor, limit=limit)
    return PageOut(items=[RateLimitOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/rate-limits", tags=["rate limits"], status_code=201, openapi_extra=_MANAGE)
async def create_rate_limit(
    ctx: Ctx, actor: CurrentActor, body: RateLimitCreate, request: Request, response: Response
) -> RateLimitOut:
    """Cap calls per member, host or tool: send `limit` ("100/minute") or both `amount` and `window_s`."""
    item = await rules.create_rate_limit(
        ctx.store,
        actor,
        per=body.per,
        limit=body.limit,
        amount=body.amount,
        window_s=body.window_s,
        strategy=body.strategy,
        gateway=body.gateway,
        name=body.name,
    )
    _created(response, request, item.rule.id)
    return RateLimitOut.of(item)


@router.get("/rate-limits/{rule_id}", tags=["rate limits"], openapi_extra=needs(*_READ))
async def get_rate_limit(ctx: Ctx, actor: CurrentActor, rule_id: RuleId) -> RateLimitOut:
    return RateLimitOut.of(await rules.get_rate_limit(ctx.store, actor, rule_id))


@router.delete(
    "/rate-limits/{rule_id}", tags=["rate limits"], openapi_extra=_MANAGE, status_code=204, response_class=Response
)
async def delete_rate_limit(ctx: Ctx, actor: CurrentActor, rule_id: RuleId) -> None:
    await rules.delete_rate_limit(ctx.store, actor, rule_id)
