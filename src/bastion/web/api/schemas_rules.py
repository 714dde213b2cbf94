"""REST bodies and responses for policy rules, content rules and rate limits."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final

from pydantic import ConfigDict, Field, StrictBool
from pydantic.config import JsonDict

from bastion.domain import naming
from bastion.domain.content import ContentAction, ContentRule, ContentTarget
from bastion.domain.policy import Effect, PolicyRule, SubjectKind, summary
from bastion.domain.ratelimits import (
    MAX_AMOUNT,
    MAX_WINDOW_S,
    LimitPer,
    RateLimitRule,
    Strategy,
    describe,
    format_limit,
)
from bastion.services.rules import Stored
from bastion.web.api.schemas import WHOLE, Body, Out, Patch, ServerName, Slug, choices

GatewayRef = Annotated[
    str, Field(min_length=1, max_length=63, description="Gateway id or slug; leave out for every gateway")
]
Pattern = Annotated[
    str,
    Field(
        min_length=1,
        max_length=500,
        description="A regular expression (Python syntax) that does not match empty text",
    ),
]
Replacement = Annotated[str, Field(max_length=200, description="Literal text; only for action `replace`")]
PrintableNamePattern = Annotated[
    str, Field(min_length=1, max_length=255, json_schema_extra={"pattern": "^[^\\x00-\\x1f]+$"})
]
SubjectRef = Annotated[str, Field(max_length=320, description="Member id or email, role name, or host id or name")]
Alias = Annotated[ServerName, Field(description="A server's alias in the gateway")]
# The limits whose amount and window are within bounds, in the forms parse_limit reads.
LIMIT_PATTERN: Final = r"^[1-9][0-9]{0,5} ?/ ?(?:second|minute|hour|day|[1-9][0-9]{0,3}s|[1-9][0-9]{0,2}m|[1-9]h|1d)$"
LimitText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=40,
        description='Like "100/minute" or "10/30s"',
        json_schema_extra={"pattern": LIMIT_PATTERN},
    ),
]
# A limit is given as text or as amount and window, never both (null stands for left out).
_ONE_LIMIT: Final[list[JsonDict]] = [
    {
        "required": ["limit"],
        "properties": {"limit": {"type": "string"}, "amount": {"type": "null"}, "window_s": {"type": "null"}},
    },
    {
        "required": ["amount", "window_s"],
        "properties": {"limit": {"type": "null"}, "amount": {"type": "integer"}, "window_s": {"type": "integer"}},
    },
]


# --- policy rules ---------------------------------------------------------------------------------------------------


# A rule for anyone names no subject; a rule for a member, role or host names one.
_SUBJECT_RULE: Final[list[JsonDict]] = [
    {
        "properties": {
            "subject_kind": {"const": SubjectKind.ANY.value},
            "subject": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": naming.BLANK_PATTERN}]},
        }
    },
    {
        "required": ["subject_kind", "subject"],
        "properties": {
            "subject_kind": {"enum": [k.value for k in SubjectKind if k is not SubjectKind.ANY]},
            "subject": {"type": "string", "pattern": naming.TRIMMED_TEXT_PATTERN},
        },
    },
]
# Only a replace rule has a replacement, and it has one.
_REPLACEMENT_RULE: Final[list[JsonDict]] = [
    {
        "required": ["replacement"],
        "properties": {
            "action": {"const": ContentAction.REPLACE.value},
            "replacement": {"type": "string", "minLength": 1},
        },
    },
    {
        "properties": {
            "action": {"enum": [a.value for a in ContentAction if a is not ContentAction.REPLACE]},
            "replacement": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]},
        }
    },
]


class PolicyCreate(Body):
    model_config = ConfigDict(json_schema_extra=choices(*_SUBJECT_RULE))

    effect: Effect
    subject_kind: SubjectKind = SubjectKind.ANY
    subject: SubjectRef | None = None
    gateway: GatewayRef | None = None
    server: Alias | None = None
    name: PrintableNamePattern | None = Field(
        default=None, description="Tool, prompt or resource name, or a pattern like `delete_*`"
    )
    description: Annotated[str, Field(max_length=500)] = ""


class PolicyOut(Out):
    id: str
    effect: Effect
    subject_kind: SubjectKind
    subject: str | None
    gateway_id: str | None
    gateway: str | None = Field(description="The gateway's slug; null for every gateway")
    server: str | None
    name: str | None
    description: str
    summary: str
    created_by: str | None
    created_at: datetime

    @classmethod
    def of(cls, item: Stored[PolicyRule]) -> PolicyOut:
        rule = item.rule
        # The summary names the gateway by slug, which people recognise; the id is in its own field.
        readable = replace(rule, gateway_id=item.gateway_slug) if rule.gateway_id else rule
        return cls(
            id=rule.id,
            effect=rule.effect,
            subject_kind=rule.subject_kind,
            subject=rule.subject,
            gateway_id=rule.gateway_id,
            gateway=item.gateway_slug,
            server=rule.server,
            name=rule.name,
            description=rule.description,
            summary=summary(readable),
            created_by=item.created_by,
            created_at=item.created_at,
        )


# --- content rules --------------------------------------------------------------------------------------------------


class ContentRuleCreate(Body):
    model_config = ConfigDict(json_schema_extra=choices(*_REPLACEMENT_RULE))

    name: Slug
    pattern: Pattern
    action: ContentAction
    target: ContentTarget = ContentTarget.BOTH
    replacement: Replacement | None = None
    gateway: GatewayRef | None = None
    enabled: StrictBool = True


class ContentRuleUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"replacement"})
    # A change of action to replace brings the replacement; to another action, none (the stored one is dropped).
    model_config = ConfigDict(
        json_schema_extra=choices(
            {"properties": {"action": {"not": {}}}},
            {
                "required": ["action", "replacement"],
                "properties": {
                    "action": {"const": ContentAction.REPLACE.value},
                    "replacement": {"type": "string", "minLength": 1},
                },
            },
            _REPLACEMENT_RULE[1],
        )
    )

    pattern: Pattern | None = None
    action: ContentAction | None = None
    target: ContentTarget | None = None
    replacement: Replacement | None = None
    enabled: StrictBool | None = None

    def changes(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.model_fields_set}


def content_summary(rule: ContentRule, gateway_slug: str | None) -> str:
    """A readable one-liner: ``mask /\\d{16}/ in both in every gateway``."""
    action = f"replace with {rule.replacement!r}" if rule.action is ContentAction.REPLACE else rule.action.value
    where = f"in gateway {gateway_slug}" if gateway_slug else "in every gateway"
    state = "" if rule.enabled else " (disabled)"
    return f"{action} /{rule.pattern}/ in {rule.target.value} {where}{state}"


class ContentRuleOut(Out):
    id: str
    name: str
    pattern: str
    action: ContentAction
    target: ContentTarget
    replacement: str | None
    gateway_id: str | None
    gateway: str | None = Field(description="The gateway's slug; null for every gateway")
    enabled: bool
    summary: str
    created_by: str | None
    created_at: datetime

    @classmethod
    def of(cls, item: Stored[ContentRule]) -> ContentRuleOut:
        rule = item.rule
        return cls(
            id=rule.id,
            name=rule.name,
            pattern=rule.pattern,
            action=rule.action,
            target=rule.target,
            replacement=rule.replacement,
            gateway_id=rule.gateway_id,
            gateway=item.gateway_slug,
            enabled=rule.enabled,
            summary=content_summary(rule, item.gateway_slug),
            created_by=item.created_by,
            created_at=item.created_at,
        )


# --- rate limits ----------------------------------------------------------------------------------------------------


class RateLimitCreate(Body):
    model_config = ConfigDict(json_schema_extra=choices(*_ONE_LIMIT, exclusive=True))

    per: LimitPer
    limit: LimitText | None = None
    amount: (
        Annotated[int, Field(ge=1, le=MAX_AMOUNT, description="Calls allowed per window (instead of `limit`)"), WHOLE]
        | None
    ) = None
    window_s: (
        Annotated[int, Field(ge=1, le=MAX_WINDOW_S, description="The window in seconds (instead of `limit`)"), WHOLE]
        | None
    ) = None
    strategy: Strategy = Strategy.FIXED
    gateway: GatewayRef | None = None
    name: PrintableNamePattern | None = Field(
        default=None, description="Namespaced tool name or a pattern like `github__*`; leave out for every tool"
    )


class RateLimitOut(Out):
    id: str
    per: LimitPer
    amount: int
    window_s: int
    limit: str = Field(description='The limit as text, like "100/minute"')
    strategy: Strategy
    gateway_id: str | None
    gateway: str | None = Field(description="The gateway's slug; null for every gateway")
    name: str | None
    summary: str
    created_by: str | None
    created_at: datetime

    @classmethod
    def of(cls, item: Stored[RateLimitRule]) -> RateLimitOut:
        rule = item.rule
        where = f" in gateway {item.gateway_slug}" if item.gateway_slug else ""
        return cls(
            id=rule.id,
            per=rule.per,
            amount=rule.amount,
            window_s=rule.window_s,
            limit=format_limit(rule.amount, rule.window_s),
            strategy=rule.strategy,
            gateway_id=rule.gateway_id,
            gateway=item.gateway_slug,
            name=rule.name,
            summary=f"{describe(rule)} ({rule.strategy.value} window){where}",
            created_by=item.created_by,
            created_at=item.created_at,
        )
