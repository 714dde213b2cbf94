"""Content rules: each action over nested JSON, blocking, and findings that never carry what they found."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.domain.content import (
    ContentAction,
    ContentRule,
    ContentTarget,
    Finding,
    Scan,
    for_gateway,
    keyed_hash,
    mask,
    scan,
)
from bastion.errors import ValidationFailed
from bastion.types import JSONValue

KEY = b"k" * 32
TOKEN = "sk-abcdef123456"
TOKEN_RE = r"sk-[a-z0-9]{12}"
ARGS: JSONValue = {
    "query": f"use {TOKEN} please",
    "nested": {"list": [TOKEN, 42, None, True, 1.5, {"deep": f"{TOKEN}/{TOKEN}"}]},
    TOKEN: "keys are not scanned",
}


def rule(
    action: ContentAction,
    pattern: str = TOKEN_RE,
    *,
    id: str = "c1",
    name: str = "api-key",
    target: ContentTarget = ContentTarget.ARGUMENTS,
    replacement: str | None = None,
    gateway_id: str | None = None,
    enabled: bool = True,
) -> ContentRule:
    return ContentRule(id, name, pattern, action, target, replacement, gateway_id, enabled)


def expected_args(replaced: str) -> JSONValue:
    return {
        "query": f"use {replaced} please",
        "nested": {"list": [replaced, 42, None, True, 1.5, {"deep": f"{replaced}/{replaced}"}]},
        TOKEN: "keys are not scanned",
    }


def only_finding(result: Scan, action: ContentAction, count: int = 4) -> None:
    assert result.findings == (Finding("c1", "api-key", action, "arguments", count),)
    assert result.blocked_by is None


# --- Each action ------------------------------------------------------------------------------------------


def test_redact_replaces_every_match_in_nested_string_values_and_leaves_keys_and_scalars() -> None:
    result = scan([rule(ContentAction.REDACT)], ARGS, "arguments", KEY)
    assert result.value == expected_args("[REDACTED]")
    only_finding(result, ContentAction.REDACT)


def test_mask_stars_all_but_the_last_four_characters() -> None:
    result = scan([rule(ContentAction.MASK)], ARGS, "arguments", KEY)
    assert result.value == expected_args("*" * 11 + "3456")
    only_finding(result, ContentAction.MASK)


@pytest.mark.parametrize(("text", "masked"), [("", ""), ("a", "*"), ("abcd", "****"), ("abcde", "*bcde")])
def test_short_matches_are_masked_entirely(text: str, masked: str) -> None:
    assert mask(text) == masked


def test_hash_replaces_a_match_with_a_keyed_digest_that_is_stable_and_key_dependent() -> None:
    digest = hmac.new(KEY, TOKEN.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
    result = scan([rule(ContentAction.HASH)], ARGS, "arguments", KEY)
    assert result.value == expected_args(f"hmac:{digest}")
    only_finding(result, ContentAction.HASH)
    assert keyed_hash(TOKEN, b"other key") != f"hmac:{digest}"


def test_replace_inserts_the_replacement_literally_without_backreferences() -> None:
    result = scan([rule(ContentAction.REPLACE, r"(sk)-\w+", replacement=r"\1 \g<0> $1")], ARGS, "arguments", KEY)
    assert result.value == expected_args(r"\1 \g<0> $1")
    only_finding(result, ContentAction.REPLACE)


def test_block_returns_the_value_unchanged_and_stops_at_the_first_blocking_rule() -> None:
    rules = [
        rule(ContentAction.REDACT, r"please", id="c0", name="polite"),
        rule(ContentAction.BLOCK),
        rule(ContentAction.BLOCK, r"\d+", id="c2", name="digits"),
        rule(ContentAction.MASK, r"use", id="c3", name="later"),
    ]
    result = scan(rules, ARGS, "arguments", KEY)
    blocked = Finding("c1", "api-key", ContentAction.BLOCK, "arguments", 4)
    assert result == Scan(ARGS, (Finding("c0", "polite", ContentAction.REDACT, "arguments", 1), blocked), blocked)


def test_a_block_rule_that_does_not_match_lets_the_scan_go_on() -> None:
    rules = [rule(ContentAction.BLOCK, "password", id="c0", name="pw"), rule(ContentAction.REDACT)]
    result = scan(rules, ARGS, "arguments", KEY)
    assert result.value == expected_args("[REDACTED]")
    only_finding(result, ContentAction.REDACT)


def test_rules_run_in_order_each_over_the_output_of_the_ones_before() -> None:
    rules = [
        rule(ContentAction.REPLACE, "secret", id="a", name="a", replacement="TOKEN"),
        rule(ContentAction.REDACT, "TOKEN", id="b", name="b"),
    ]
    result = scan(rules, "my secret", "arguments", KEY)
    assert result.value == "my [REDACTED]"
    assert [f.rule_id for f in result.findings] == ["a", "b"]


def test_a_rule_for_results_does_not_touch_arguments_and_both_touches_both() -> None:
    for_results = rule(ContentAction.REDACT, target=ContentTarget.RESULTS)
    assert scan([for_results], ARGS, "arguments", KEY) == Scan(ARGS, (), None)
    assert scan([for_results], TOKEN, "results", KEY).value == "[REDACTED]"
    for_both = rule(ContentAction.REDACT, target=ContentTarget.BOTH)
    assert scan([for_both], TOKEN, "arguments", KEY).value == "[REDACTED]"
    assert scan([for_both], TOKEN, "results", KEY).findings[0].where == "results"


def test_a_disabled_rule_does_nothing() -> None:
    assert scan([rule(ContentAction.BLOCK, enabled=False)], ARGS, "arguments", KEY) == Scan(ARGS, (), None)


def test_scalars_and_empty_containers_pass_through() -> None:
    values: list[JSONValue] = [None, 3, 2.5, False, [], {}]
    for value in values:
        assert scan([rule(ContentAction.REDACT, r"\w+")], value, "results", KEY) == Scan(value, (), None)


def test_zero_width_matches_are_neither_replaced_nor_counted() -> None:
    result = scan([rule(ContentAction.REDACT, r"\b")], "two words", "arguments", KEY)
    assert result == Scan("two words", (), None)


def test_scanning_an_unknown_direction_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="arguments"):
        scan([], "x", "both", KEY)


def test_rules_for_a_gateway_are_its_own_and_the_global_ones_in_order() -> None:
    rules = [
        rule(ContentAction.REDACT, id="a", gateway_id="g1"),
        rule(ContentAction.REDACT, id="b"),
        rule(ContentAction.REDACT, id="c", gateway_id="g2"),
    ]
    assert [r.id for r in for_gateway(rules, "g1")] == ["a", "b"]


# --- Validation ------------------------------------------------------------------------------------------


def test_a_valid_rule_passes_validation_and_a_blank_replacement_on_other_actions_is_dropped() -> None:
    assert rule(ContentAction.MASK).validated() == rule(ContentAction.MASK)
    assert rule(ContentAction.MASK, replacement="").validated() == rule(ContentAction.MASK)
    replacing = rule(ContentAction.REPLACE, replacement="<key>")
    assert replacing.validated() == replacing


def test_an_invalid_regex_is_a_clear_validation_error() -> None:
    with pytest.raises(ValidationFailed, match=r"not a valid regular expression: .*position") as caught:
        rule(ContentAction.REDACT, "sk-(unclosed").validated()
    assert caught.value.field == "pattern"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (rule(ContentAction.REDACT, name="Not A Slug"), "name"),
        (rule(ContentAction.REDACT, name="x" * 64), "name"),
        (rule(ContentAction.REDACT, ""), "pattern"),
        (rule(ContentAction.REDACT, "x" * 501), "pattern"),
        (rule(ContentAction.REDACT, "a*"), "pattern"),
        (rule(ContentAction.REDACT, "[z-a]"), "pattern"),
        (rule(ContentAction.REPLACE), "replacement"),
        (rule(ContentAction.REPLACE, replacement=""), "replacement"),
        (rule(ContentAction.REPLACE, replacement="x" * 201), "replacement"),
        (rule(ContentAction.REDACT, replacement="nope"), "replacement"),
        (rule(ContentAction.REDACT, gateway_id=""), "gateway_id"),
        (ContentRule("c1", "n", "x", "explode", ContentTarget.BOTH), "action"),  # type: ignore[arg-type]
        (ContentRule("c1", "n", "x", ContentAction.REDACT, "headers"), "target"),  # type: ignore[arg-type]
    ],
)
def test_an_invalid_rule_is_refused_naming_the_field(bad: ContentRule, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        bad.validated()
    assert caught.value.field == field


# --- Properties: what was found never leaves in findings, nor in the output of a hiding action ---------------

# Secrets and the text around them use disjoint alphabets, and neither shares a character with "[REDACTED]",
# "hmac:<hex>" or the mask's "*", so an occurrence can only be one that was embedded.
SECRET_CHARS = "gijklnopqrstuvwxyz"
OTHER_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;-_/"
secrets_ = st.text(SECRET_CHARS, min_size=8, max_size=40)
plain = st.text(OTHER_CHARS, max_size=20)


@st.composite
def json_with(draw: st.DrawFn, secret: str) -> tuple[JSONValue, int]:
    """A random JSON value with ``secret`` embedded in some of its strings, and how many times."""
    holder = st.tuples(plain, plain).map(lambda ab: f"{ab[0]}{secret}{ab[1]}")
    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | plain | holder
    value = draw(
        st.recursive(
            leaves,
            lambda children: st.lists(children, max_size=4) | st.dictionaries(plain, children, max_size=4),
            max_leaves=12,
        )
    )
    wrapped: JSONValue = [value, f"{draw(plain)}{secret}"]  # at least one occurrence
    return wrapped, repr(wrapped).count(secret)


@given(
    secret=secrets_,
    data=st.data(),
    action=st.sampled_from([ContentAction.REDACT, ContentAction.MASK, ContentAction.HASH, ContentAction.BLOCK]),
)
def test_findings_never_contain_the_secret_and_hiding_actions_remove_it_from_the_output(
    secret: str, data: st.DataObject, action: ContentAction
) -> None:
    value, occurrences = data.draw(json_with(secret))
    result = scan([rule(action, re.escape(secret), target=ContentTarget.BOTH)], value, "results", KEY)
    assert secret not in repr(result.findings)
    assert secret not in repr(result.blocked_by)
    assert [f.count for f in result.findings] == [occurrences]
    if action is ContentAction.BLOCK:
        assert result.value == value
        assert result.blocked_by == result.findings[0]
    else:
        assert secret not in repr(result.value)


@given(value=st.recursive(st.none() | st.integers() | plain, lambda c: st.lists(c) | st.dictionaries(plain, c)))
def test_a_rule_that_finds_nothing_leaves_the_value_equal_and_reports_nothing(value: JSONValue) -> None:
    assert scan([rule(ContentAction.REDACT, "[g-z]{3}")], value, "arguments", KEY) == Scan(value, (), None)
