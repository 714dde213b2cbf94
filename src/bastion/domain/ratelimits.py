"""Rate-limit rules: how many calls per window, counted per member, per host or per tool."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from bastion.domain.specs import choice
from bastion.errors import ValidationFailed

MIN_AMOUNT: Final = 1
MAX_AMOUNT: Final = 1_000_000
MIN_WINDOW_S: Final = 1
MAX_WINDOW_S: Final = 86_400
NAME_PATTERN_MAX_CHARS: Final = 255
_LIMIT_MAX_CHARS: Final = 40  # far longer than any valid limit; keeps int() away from huge digit strings
_UNIT_WORDS_S: Final = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
_UNIT_LETTERS_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_LIMIT_RE: Final = re.compile(
    r"(?P<amount>[0-9]+)\s*/\s*(?:(?P<word>second|minute|hour|day)|(?P<count>[0-9]+)\s*(?P<letter>[smhd]))"
)
_LIMIT_HINT: Final = 'write a limit like "100/minute" or "10/30s" (units: second, minute, hour, day or s, m, h, d)'


class LimitPer(StrEnum):
    MEMBER = "member"
    HOST = "host"
    TOOL = "tool"


class Strategy(StrEnum):
    FIXED = "fixed"  # fixed window
    SLIDING = "sliding"  # sliding window (counter approximation)


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    id: str
    per: LimitPer
    amount: int  # calls allowed
    window_s: int  # per this many seconds
    strategy: Strategy
    gateway_id: str | None = None  # None: every gateway
    name: str | None = None  # fnmatch pattern on the namespaced tool name the caller used; None: every tool

    def validated(self) -> RateLimitRule:
        """This rule if it can be enforced, or a ValidationFailed naming the first field that is wrong."""
        per = choice(LimitPer, self.per, field="per")
        strategy = choice(Strategy, self.strategy, field="strategy")
        _check_amount(self.amount)
        _check_window(self.window_s)
        if self.gateway_id == "":
            raise ValidationFailed(
                "gateway_id must not be empty; leave it out to mean every gateway", field="gateway_id"
            )
        if self.name is not None and (
            not self.name or len(self.name) > NAME_PATTERN_MAX_CHARS or any(ord(ch) < 32 for ch in self.name)
        ):
            raise ValidationFailed(
                f"name must be 1-{NAME_PATTERN_MAX_CHARS} printable characters (a tool name or a pattern like "
                "github__*); leave it out to mean every tool",
                field="name",
            )
        return RateLimitRule(self.id, per, self.amount, self.window_s, strategy, self.gateway_id, self.name)


def parse_limit(text: str) -> tuple[int, int]:
    """``(amount, window_s)`` from ``"100/minute"``, ``"10/30s"``, ``"5000/1d"``.

    Raises:
        ValidationFailed: not of that form, or the amount or window out of bounds.
    """
    cleaned = text.strip().lower()
    found = _LIMIT_RE.fullmatch(cleaned) if len(cleaned) <= _LIMIT_MAX_CHARS else None
    if found is None:
        raise ValidationFailed(f"{text[:_LIMIT_MAX_CHARS]!r} is not a rate limit; {_LIMIT_HINT}", field="limit")
    amount = int(found["amount"])
    if found["word"] is not None:
        window_s = _UNIT_WORDS_S[found["word"]]
    else:
        window_s = int(found["count"]) * _UNIT_LETTERS_S[found["letter"]]
    _check_amount(amount, field="limit")
    _check_window(window_s, field="limit")
    return amount, window_s


def format_limit(amount: int, window_s: int) -> str:
    """The shortest text ``parse_limit`` reads back as ``(amount, window_s)``: ``"100/minute"``, ``"10/30s"``."""
    for word, seconds in _UNIT_WORDS_S.items():
        if window_s == seconds:
            return f"{amount}/{word}"
    for letter in ("d", "h", "m"):
        if window_s % _UNIT_LETTERS_S[letter] == 0:
            return f"{amount}/{window_s // _UNIT_LETTERS_S[letter]}{letter}"
    return f"{amount}/{window_s}s"


def applies(rule: RateLimitRule, gateway_id: str, tool: str) -> bool:
    """Whether ``rule`` counts a call to ``tool`` (the namespaced name the caller used) in ``gateway_id``."""
    return (rule.gateway_id is None or rule.gateway_id == gateway_id) and (
        rule.name is None or fnmatch.fnmatchcase(tool, rule.name)
    )


def key_for(rule: RateLimitRule, member_id: str, host_id: str, tool: str) -> str:
    """The counter a call goes to: one per rule and member, host or tool, as the rule counts."""
    match rule.per:
        case LimitPer.MEMBER:
            return f"{rule.id}:{member_id}"
        case LimitPer.HOST:
            return f"{rule.id}:{host_id}"
        case LimitPer.TOOL:
            return f"{rule.id}:{tool}"


def describe(rule: RateLimitRule) -> str:
    """A readable one-liner: ``100 per 60 s per member on github__*``."""
    text = f"{rule.amount} per {rule.window_s} s per {rule.per}"
    return text if rule.name is None else f"{text} on {rule.name}"


def _check_amount(amount: int, *, field: str = "amount") -> None:
    if not MIN_AMOUNT <= amount <= MAX_AMOUNT:
        raise ValidationFailed(f"the amount must be {MIN_AMOUNT}-{MAX_AMOUNT:,} calls", field=field)


def _check_window(window_s: int, *, field: str = "window_s") -> None:
    if not MIN_WINDOW_S <= window_s <= MAX_WINDOW_S:
        raise ValidationFailed(
            f"the window must be {MIN_WINDOW_S} second to {MAX_WINDOW_S:,} seconds (one day)", field=field
        )
