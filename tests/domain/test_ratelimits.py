"""Rate-limit rules: the limit parser, validation, which calls a rule counts and where it counts them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.domain.ratelimits import (
    MAX_AMOUNT,
    MAX_WINDOW_S,
    LimitPer,
    RateLimitRule,
    Strategy,
    applies,
    describe,
    format_limit,
    key_for,
    parse_limit,
)
from bastion.errors import ValidationFailed


def rule(per: LimitPer = LimitPer.MEMBER, *, gateway_id: str | None = None, name: str | None = None) -> RateLimitRule:
    return RateLimitRule("rl1", per, 100, 60, Strategy.SLIDING, gateway_id, name)


# --- The parser -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("100/minute", (100, 60)),
        ("1/second", (1, 1)),
        ("5000/hour", (5000, 3600)),
        ("1000000/day", (1_000_000, 86_400)),
        ("10/30s", (10, 30)),
        ("10/5m", (10, 300)),
        ("3/2h", (3, 7200)),
        ("7/1d", (7, 86_400)),
        ("  20 / 15 S ", (20, 15)),
        ("20/Minute", (20, 60)),
    ],
)
def test_limits_are_read_in_words_or_in_counted_units(text: str, limit: tuple[int, int]) -> None:
    assert parse_limit(text) == limit


@pytest.mark.parametrize(
    "text",
    [
        "",
        "100",
        "100/",
        "/minute",
        "100/minutes",
        "100/fortnight",
        "-1/minute",
        "1.5/minute",
        "100/30",
        "100/30x",
        "0/minute",
        "1000001/minute",
        "1/0s",
        "1/25h",
        "1/2d",
        "1/86401s",
        "9" * 5000 + "/minute",
        "\u0661\u0660/minute",  # Arabic-Indic digits are digits to str.isdigit, not to a limit
    ],
)
def test_anything_else_is_a_clear_validation_error(text: str) -> None:
    with pytest.raises(ValidationFailed, match=r"limit|amount|window") as caught:
        parse_limit(text)
    assert caught.value.field == "limit"


@given(amount=st.integers(1, MAX_AMOUNT), window_s=st.integers(1, MAX_WINDOW_S))
def test_every_valid_limit_formats_to_text_that_parses_back(amount: int, window_s: int) -> None:
    assert parse_limit(format_limit(amount, window_s)) == (amount, window_s)


@given(text=st.text(max_size=30) | st.from_regex(r"[0-9]{1,8}/[0-9]{0,6}[smhd]?[a-z]{0,6}", fullmatch=True))
def test_parsing_any_text_gives_a_bounded_limit_or_a_validation_error(text: str) -> None:
    try:
        amount, window_s = parse_limit(text)
    except ValidationFailed:
        return
    assert 1 <= amount <= MAX_AMOUNT
    assert 1 <= window_s <= MAX_WINDOW_S


def test_limits_format_in_the_largest_whole_unit() -> None:
    assert [format_limit(5, w) for w in (1, 60, 3600, 86_400, 30, 120, 7200, 90)] == [
        "5/second",
        "5/minute",
        "5/hour",
        "5/day",
        "5/30s",
        "5/2m",
        "5/2h",
        "5/90s",
    ]


# --- Rules ------------------------------------------------------------------------------------------------


def test_a_valid_rule_passes_validation_and_text_enums_are_coerced() -> None:
    assert rule(name="github__*").validated() == rule(name="github__*")
    as_text = replace(rule(), per="host", strategy="fixed")
    assert as_text.validated() == replace(rule(LimitPer.HOST), strategy=Strategy.FIXED)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (replace(rule(), amount=0), "amount"),
        (replace(rule(), amount=MAX_AMOUNT + 1), "amount"),
        (replace(rule(), window_s=0), "window_s"),
        (replace(rule(), window_s=MAX_WINDOW_S + 1), "window_s"),
        (replace(rule(), per="workspace"), "per"),
        (replace(rule(), strategy="leaky"), "strategy"),
        (rule(name=""), "name"),
        (rule(name="x" * 256), "name"),
        (rule(gateway_id=""), "gateway_id"),
    ],
)
def test_an_invalid_rule_is_refused_naming_the_field(bad: RateLimitRule, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        bad.validated()
    assert caught.value.field == field


def test_a_rule_counts_calls_in_its_gateway_to_the_tools_its_pattern_names() -> None:
    assert applies(rule(), "g1", "github__create_issue")
    assert applies(rule(gateway_id="g1", name="github__*"), "g1", "github__create_issue")
    assert not applies(rule(gateway_id="g2"), "g1", "github__create_issue")
    assert not applies(rule(name="slack__*"), "g1", "github__create_issue")
    assert not applies(rule(name="GITHUB__*"), "g1", "github__create_issue")


def test_calls_are_counted_per_rule_and_per_member_host_or_tool() -> None:
    keys = {per: key_for(rule(per), "m1", "h1", "github__read") for per in LimitPer}
    assert keys == {LimitPer.MEMBER: "rl1:m1", LimitPer.HOST: "rl1:h1", LimitPer.TOOL: "rl1:github__read"}


def test_a_rule_describes_itself_in_one_line() -> None:
    assert describe(rule()) == "100 per 60 s per member"
    assert describe(rule(LimitPer.TOOL, name="github__*")) == "100 per 60 s per tool on github__*"
