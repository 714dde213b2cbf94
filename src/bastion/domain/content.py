"""Content rules: regex detectors over tool-call arguments and results, each with an action. Pure code.

Rules run in the order given, each over the output of the ones before it, so the order is the
administrator's to set. Strings are scanned whole, however long: scanning only a prefix would let a
caller pad a secret past the limit. What bounds the work is the body-size cap at the edges.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from bastion.domain import naming
from bastion.domain.specs import choice
from bastion.errors import ValidationFailed
from bastion.types import JSONValue

PATTERN_MAX_CHARS: Final = 500
REPLACEMENT_MAX_CHARS: Final = 200
REDACTED: Final = "[REDACTED]"
MASK_KEEP_CHARS: Final = 4
HASH_PREFIX: Final = "hmac:"
HASH_HEX_CHARS: Final = 16
_COMPILED_CACHE_SIZE: Final = 1024


class ContentAction(StrEnum):
    BLOCK = "block"  # refuse the call (arguments) or withhold the result (results)
    REDACT = "redact"  # the match becomes "[REDACTED]"
    MASK = "mask"  # every character of the match but the last four becomes "*"
    HASH = "hash"  # the match becomes "hmac:" + 16 hex digits of HMAC-SHA256(key, match)
    REPLACE = "replace"  # the match becomes the rule's replacement text (literal, no backreferences)


class ContentTarget(StrEnum):
    ARGUMENTS = "arguments"
    RESULTS = "results"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class ContentRule:
    id: str
    name: str
    pattern: str
    action: ContentAction
    target: ContentTarget
    replacement: str | None = None
    gateway_id: str | None = None  # None: every gateway
    enabled: bool = True

    def validated(self) -> ContentRule:
        """This rule if it can run, or a ValidationFailed naming the first field that is wrong."""
        name = naming.slug(self.name, field="name")
        action = choice(ContentAction, self.action, field="action")
        target = choice(ContentTarget, self.target, field="target")
        pattern = _pattern(self.pattern)
        replacement = _replacement(action, self.replacement)
        if self.gateway_id == "":
            raise ValidationFailed(
                "gateway_id must not be empty; leave it out to mean every gateway", field="gateway_id"
            )
        return ContentRule(self.id, name, pattern, action, target, replacement, self.gateway_id, self.enabled)


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule that matched, how often, and where. Never the matched text."""

    rule_id: str
    rule_name: str
    action: ContentAction
    where: str  # "arguments" or "results"
    count: int


@dataclass(frozen=True, slots=True)
class Scan:
    value: JSONValue  # the value with redact/mask/hash/replace applied (unchanged when blocked)
    findings: tuple[Finding, ...]
    blocked_by: Finding | None


def scan(rules: Sequence[ContentRule], value: JSONValue, where: str, hash_key: bytes) -> Scan:
    """Apply the enabled rules for ``where`` to every string value inside ``value`` (not to object keys).

    A BLOCK rule that matches stops the scan: the value comes back as it was given, with ``blocked_by`` set.

    Raises:
        ValueError: ``where`` is neither "arguments" nor "results".
    """
    if where not in (ContentTarget.ARGUMENTS, ContentTarget.RESULTS):
        raise ValueError(f"where must be 'arguments' or 'results', not {where!r}")
    current = value
    findings: list[Finding] = []
    for rule in rules:
        if not rule.enabled or rule.target not in (where, ContentTarget.BOTH):
            continue
        counter = _Counter()
        current = _walk(current, _substitution(rule, hash_key, counter))
        if not counter.count:
            continue
        finding = Finding(rule.id, rule.name, ContentAction(rule.action), where, counter.count)
        findings.append(finding)
        if finding.action is ContentAction.BLOCK:
            return Scan(value, tuple(findings), finding)
    return Scan(current, tuple(findings), None)


def for_gateway(rules: Sequence[ContentRule], gateway_id: str) -> tuple[ContentRule, ...]:
    """The rules that apply in ``gateway_id``: those scoped to it and those for every gateway, in order."""
    return tuple(rule for rule in rules if rule.gateway_id is None or rule.gateway_id == gateway_id)


def mask(text: str) -> str:
    """``text`` with every character but the last four starred; four or fewer become all stars."""
    if len(text) <= MASK_KEEP_CHARS:
        return "*" * len(text)
    return "*" * (len(text) - MASK_KEEP_CHARS) + text[-MASK_KEEP_CHARS:]


def keyed_hash(text: str, key: bytes) -> str:
    """``hmac:`` and the first 16 hex digits of HMAC-SHA256(key, text): equal inputs stay comparable."""
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:HASH_HEX_CHARS]


@functools.lru_cache(maxsize=_COMPILED_CACHE_SIZE)
def compiled(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled once; a bad pattern is a ValidationFailed naming the problem."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ValidationFailed(
            f"pattern is not a valid regular expression: {exc.msg}{where}", field="pattern"
        ) from None


class _Counter:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _substitution(rule: ContentRule, hash_key: bytes, counter: _Counter) -> Callable[[str], str]:
    regex = compiled(rule.pattern)
    action = ContentAction(rule.action)
    replacement = rule.replacement or ""

    def replace(match: re.Match[str]) -> str:
        text = match.group()
        if not text:  # a pattern that can match nothing would otherwise fire between every character
            return text
        counter.count += 1
        match action:
            case ContentAction.BLOCK:
                return text
            case ContentAction.REDACT:
                return REDACTED
            case ContentAction.MASK:
                return mask(text)
            case ContentAction.HASH:
                return keyed_hash(text, hash_key)
            case ContentAction.REPLACE:
                return replacement  # returned from a function, so backslashes and \\1 stay literal

    return lambda text: regex.sub(replace, text)


def _walk(value: JSONValue, on_string: Callable[[str], str]) -> JSONValue:
    if isinstance(value, str):
        return on_string(value)
    if isinstance(value, list):
        return [_walk(item, on_string) for item in value]
    if isinstance(value, dict):
        return {key: _walk(item, on_string) for key, item in value.items()}
    return value


def _pattern(value: str) -> str:
    if not value:
        raise ValidationFailed("pattern must not be empty", field="pattern")
    if len(value) > PATTERN_MAX_CHARS:
        raise ValidationFailed(f"pattern must be at most {PATTERN_MAX_CHARS} characters", field="pattern")
    if compiled(value).search("") is not None:
        raise ValidationFailed(
            "pattern must not match empty text; use + rather than * for the repeated part", field="pattern"
        )
    return value


def _replacement(action: ContentAction, value: str | None) -> str | None:
    if action is not ContentAction.REPLACE:
        if value:
            raise ValidationFailed(f"only a replace rule takes a replacement, not a {action} rule", field="replacement")
        return None
    if not value:
        raise ValidationFailed("a replace rule needs the replacement text", field="replacement")
    if len(value) > REPLACEMENT_MAX_CHARS:
        raise ValidationFailed(f"replacement must be at most {REPLACEMENT_MAX_CHARS} characters", field="replacement")
    return value
