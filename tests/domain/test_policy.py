"""Policy decisions: deny wins, allow rules make allow-lists, and the answer never depends on rule order."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.domain.policy import (
    Decision,
    Effect,
    PolicyRule,
    Subject,
    SubjectKind,
    Target,
    applies,
    decide,
    matches,
    summary,
)
from bastion.errors import ValidationFailed

ADA = Subject("m-ada", "Ada@Example.com", "owner", "h-laptop", "laptop")
BOB = Subject("m-bob", "bob@example.com", "viewer", "h-ci", "ci")
DELETE = Target("g1", "github", "delete_repo")
READ = Target("g1", "github", "read_file")


def rule(
    id: str = "r1",
    effect: Effect = Effect.DENY,
    kind: SubjectKind = SubjectKind.ANY,
    subject: str | None = None,
    *,
    gateway_id: str | None = None,
    server: str | None = None,
    name: str | None = None,
    description: str = "",
) -> PolicyRule:
    return PolicyRule(id, effect, kind, subject, gateway_id, server, name, description)


# --- Strategies: small alphabets, so rules and callers collide often -------------------------------------------

GATEWAYS = ("g1", "g2")
SERVERS = ("github", "slack")
NAMES = ("read_file", "delete_repo", "post", "write")
PATTERNS = ("*", "delete_*", "read_file", "?ost", "w*", "[dr]*")

subjects = st.builds(
    Subject,
    member_id=st.sampled_from(("m-ada", "m-bob")),
    member_email=st.sampled_from(("ada@example.com", "ADA@example.com", "bob@example.com")),
    role=st.sampled_from(("owner", "viewer")),
    host_id=st.sampled_from(("h-laptop", "h-ci")),
    host_name=st.sampled_from(("laptop", "ci")),
)
targets = st.builds(
    Target, gateway_id=st.sampled_from(GATEWAYS), server=st.sampled_from(SERVERS), name=st.sampled_from(NAMES)
)
SUBJECT_VALUES = {
    SubjectKind.MEMBER: ("m-ada", "m-bob", "ada@EXAMPLE.com", "bob@example.com"),
    SubjectKind.ROLE: ("owner", "viewer"),
    SubjectKind.HOST: ("h-laptop", "h-ci", "laptop", "ci"),
}


@st.composite
def rules_without_id(draw: st.DrawFn, effect: Effect | None = None) -> PolicyRule:
    kind = draw(st.sampled_from(SubjectKind))
    return rule(
        "",
        draw(st.sampled_from(Effect)) if effect is None else effect,
        kind,
        None if kind is SubjectKind.ANY else draw(st.sampled_from(SUBJECT_VALUES[kind])),
        gateway_id=draw(st.none() | st.sampled_from(GATEWAYS)),
        server=draw(st.none() | st.sampled_from(SERVERS)),
        name=draw(st.none() | st.sampled_from(PATTERNS)),
        description=draw(st.sampled_from(("", "why not"))),
    )


def numbered(rules: list[PolicyRule], start: int = 0) -> list[PolicyRule]:
    return [replace(r, id=f"r{start + i:03}") for i, r in enumerate(rules)]


rule_sets = st.lists(rules_without_id(), max_size=12).map(numbered)


@st.composite
def deny_matching(draw: st.DrawFn, subject: Subject, target: Target) -> PolicyRule:
    """A deny rule that applies to ``target`` and names ``subject``, in any of the ways a rule can."""
    kind = draw(st.sampled_from(SubjectKind))
    who = {
        SubjectKind.ANY: (None,),
        SubjectKind.MEMBER: (subject.member_id, subject.member_email.upper(), subject.member_email),
        SubjectKind.ROLE: (subject.role,),
        SubjectKind.HOST: (subject.host_id, subject.host_name),
    }[kind]
    return rule(
        "zz-deny",
        Effect.DENY,
        kind,
        draw(st.sampled_from(who)),
        gateway_id=draw(st.sampled_from((None, target.gateway_id))),
        server=draw(st.sampled_from((None, target.server))),
        name=draw(st.sampled_from((None, target.name, "*", target.name[:2] + "*"))),
    )


# --- Examples ----------------------------------------------------------------------------------------------


def test_no_rules_allow_everything_and_say_so() -> None:
    assert decide([], ADA, DELETE) == Decision(True, None, "no policy rule applies")


def test_rules_for_other_targets_leave_a_target_allowed() -> None:
    rules = [
        rule("r1", gateway_id="g2"),
        rule("r2", server="slack"),
        rule("r3", name="read_*"),
        rule("r4", Effect.ALLOW, SubjectKind.ROLE, "owner", name="read_*"),
    ]
    assert decide(rules, BOB, DELETE) == Decision(True, None, "no policy rule applies")


def test_a_deny_rule_names_itself_and_its_description_in_the_reason() -> None:
    rules = [rule("r7", Effect.DENY, SubjectKind.ROLE, "viewer", server="github", description="read-only role")]
    assert decide(rules, BOB, DELETE) == Decision(False, "r7", "denied by policy rule r7: read-only role")


def test_a_deny_rule_without_a_description_is_summarised_in_the_reason() -> None:
    decision = decide([rule("r7", Effect.DENY, SubjectKind.ROLE, "viewer", name="delete_*")], BOB, DELETE)
    assert decision.reason == "denied by policy rule r7: deny role viewer on */delete_* in every gateway"


def test_a_deny_rule_for_someone_else_does_not_deny() -> None:
    decision = decide([rule("r1", Effect.DENY, SubjectKind.ROLE, "viewer")], ADA, DELETE)
    assert decision == Decision(True, None, "no policy rule applies")


def test_an_allow_rule_makes_its_target_an_allow_list() -> None:
    rules = [rule("r1", Effect.ALLOW, SubjectKind.ROLE, "owner", server="github", name="delete_*")]
    assert decide(rules, ADA, DELETE) == Decision(
        True, "r1", "allowed by policy rule r1: allow role owner on github/delete_* in every gateway"
    )
    assert decide(rules, BOB, DELETE) == Decision(False, None, "not allowed by any policy rule for github/delete_repo")
    assert decide(rules, BOB, READ).allowed


def test_deny_wins_over_a_more_specific_allow() -> None:
    rules = [
        rule("r1", Effect.ALLOW, SubjectKind.MEMBER, "m-ada", gateway_id="g1", server="github", name="delete_repo"),
        rule("r2", Effect.DENY, SubjectKind.ANY, name="delete_*"),
    ]
    assert decide(rules, ADA, DELETE) == Decision(False, "r2", "denied by policy rule r2: " + summary(rules[1]))


def test_member_rules_match_the_id_or_the_email_in_any_case() -> None:
    for subject in ("m-ada", "ada@example.com", "ADA@EXAMPLE.COM"):
        assert not decide([rule("r1", Effect.DENY, SubjectKind.MEMBER, subject)], ADA, DELETE).allowed
    assert decide([rule("r1", Effect.DENY, SubjectKind.MEMBER, "M-ADA")], ADA, DELETE).allowed


def test_host_rules_match_the_host_id_or_name_and_role_rules_the_role() -> None:
    for kind, subject in ((SubjectKind.HOST, "h-ci"), (SubjectKind.HOST, "ci"), (SubjectKind.ROLE, "viewer")):
        assert not decide([rule("r1", Effect.DENY, kind, subject)], BOB, DELETE).allowed
        assert decide([rule("r1", Effect.DENY, kind, subject)], ADA, DELETE).allowed


def test_name_patterns_are_case_sensitive_globs() -> None:
    assert not decide([rule(name="delete_*")], ADA, DELETE).allowed
    assert decide([rule(name="DELETE_*")], ADA, DELETE).allowed
    assert not decide([rule(name="delete_rep?")], ADA, DELETE).allowed


def test_of_several_matching_deny_rules_the_most_specific_decides_then_the_lowest_id() -> None:
    broad = rule("r1")
    scoped = rule("r9", server="github", name="delete_*")
    exact = rule("r5", server="github", name="delete_repo")
    assert decide([broad, scoped, exact], ADA, DELETE).rule_id == "r5"
    assert decide([broad, scoped], ADA, DELETE).rule_id == "r9"
    assert decide([rule("r3", server="github"), rule("r2", server="github")], ADA, DELETE).rule_id == "r2"


# --- Validation ------------------------------------------------------------------------------------------


def test_a_valid_rule_comes_back_trimmed() -> None:
    raw = rule(
        "r1",
        Effect.ALLOW,
        SubjectKind.MEMBER,
        "  ada@example.com ",
        server="git.hub-1",
        name="delete_*",
        description=" x ",
    )
    assert raw.validated() == replace(raw, subject="ada@example.com", description="x")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (rule(kind=SubjectKind.ROLE, subject=None), "subject"),
        (rule(kind=SubjectKind.MEMBER, subject="   "), "subject"),
        (rule(kind=SubjectKind.HOST, subject="x" * 321), "subject"),
        (rule(kind=SubjectKind.ANY, subject="someone"), "subject"),
        (rule(server="has__double"), "server"),
        (rule(server="x" * 64), "server"),
        (rule(server="has space"), "server"),
        (rule(name=""), "name"),
        (rule(name="x" * 256), "name"),
        (rule(name="tab\there"), "name"),
        (rule(description="x" * 501), "description"),
        (rule(gateway_id=""), "gateway_id"),
        (replace(rule(), effect="maybe"), "effect"),
        (replace(rule(), subject_kind="everyone"), "subject_kind"),
    ],
)
def test_an_invalid_rule_is_refused_naming_the_field(bad: PolicyRule, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        bad.validated()
    assert caught.value.field == field


def test_enum_fields_given_as_text_are_coerced() -> None:
    raw = replace(rule(), effect="allow", subject_kind="role", subject="owner")
    assert raw.validated() == rule("r1", Effect.ALLOW, SubjectKind.ROLE, "owner")


# --- Properties -------------------------------------------------------------------------------------------


@given(rules=rule_sets, subject=subjects, target=targets, data=st.data())
def test_adding_a_matching_deny_rule_to_any_rule_set_denies(
    rules: list[PolicyRule], subject: Subject, target: Target, data: st.DataObject
) -> None:
    deny = data.draw(deny_matching(subject, target))
    position = data.draw(st.integers(0, len(rules)))
    decision = decide([*rules[:position], deny, *rules[position:]], subject, target)
    assert not decision.allowed
    assert decision.rule_id is not None
    assert decision.reason.startswith(f"denied by policy rule {decision.rule_id}: ")


@given(rules=rule_sets, subject=subjects, target=targets)
def test_a_block_all_rule_denies_every_target(rules: list[PolicyRule], subject: Subject, target: Target) -> None:
    block_all = rule("block-all", Effect.DENY, SubjectKind.ANY)
    assert decide([*rules, block_all], subject, target).allowed is False


@given(rules=rule_sets, extra=st.lists(rules_without_id(Effect.ALLOW), max_size=6), subject=subjects, target=targets)
def test_adding_allow_rules_never_lifts_a_denial_by_a_deny_rule(
    rules: list[PolicyRule], extra: list[PolicyRule], subject: Subject, target: Target
) -> None:
    before = decide(rules, subject, target)
    after = decide([*rules, *numbered(extra, start=len(rules))], subject, target)
    if not before.allowed and before.rule_id is not None:
        assert after == before


@given(rules=rule_sets, subject=subjects, offered=st.lists(targets, max_size=8))
def test_policy_only_narrows_what_provisioning_offers(
    rules: list[PolicyRule], subject: Subject, offered: list[Target]
) -> None:
    allowed = [t for t in offered if decide(rules, subject, t).allowed]
    assert set(allowed) <= set(offered)
    for t in offered:
        decision = decide(rules, subject, t)
        by_id = {r.id: r for r in rules}
        if decision.rule_id is not None:
            deciding = by_id[decision.rule_id]
            assert deciding.effect == (Effect.ALLOW if decision.allowed else Effect.DENY)


@given(rules=rule_sets, subject=subjects, target=targets, data=st.data())
def test_the_decision_does_not_depend_on_rule_order(
    rules: list[PolicyRule], subject: Subject, target: Target, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(rules))
    assert decide(shuffled, subject, target) == decide(rules, subject, target)


@given(rules=rule_sets, subject=subjects, target=targets)
def test_allow_rules_alone_refuse_only_targets_they_make_an_allow_list(
    rules: list[PolicyRule], subject: Subject, target: Target
) -> None:
    allows_only = [r for r in rules if r.effect == Effect.ALLOW]
    decision = decide(allows_only, subject, target)
    if not decision.allowed:
        assert decision.rule_id is None
        assert any(applies(r, target) for r in allows_only)
        assert not any(applies(r, target) and matches(r, subject) for r in allows_only)
