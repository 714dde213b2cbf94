"""Policy: who may use which tool, prompt or resource, decided in pure code with a reason. Deny wins.

Policy only ever narrows what provisioning offers: it is evaluated on what is already provisioned.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from bastion.domain import naming
from bastion.domain.specs import choice
from bastion.errors import ValidationFailed

SUBJECT_MAX_CHARS: Final = 320  # an email address can be this long
NAME_PATTERN_MAX_CHARS: Final = 255
DESCRIPTION_MAX_CHARS: Final = 500
_GLOB_CHARS: Final = frozenset("*?[")


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class SubjectKind(StrEnum):
    ANY = "any"
    MEMBER = "member"  # subject: member id or email
    ROLE = "role"  # subject: role name
    HOST = "host"  # subject: host id or name


@dataclass(frozen=True, slots=True)
class PolicyRule:
    id: str
    effect: Effect
    subject_kind: SubjectKind
    subject: str | None  # None only with SubjectKind.ANY
    gateway_id: str | None  # None: every gateway
    server: str | None  # the server's alias in the gateway; None: every server
    name: str | None  # fnmatch pattern on the upstream name (tool, prompt, or resource URI); None: everything
    description: str = ""

    def validated(self) -> PolicyRule:
        """This rule with its text trimmed, or a ValidationFailed naming the first field that is wrong."""
        effect = choice(Effect, self.effect, field="effect")
        kind = choice(SubjectKind, self.subject_kind, field="subject_kind")
        subject = _subject(kind, self.subject)
        if self.gateway_id == "":
            raise ValidationFailed(
                "gateway_id must not be empty; leave it out to mean every gateway", field="gateway_id"
            )
        server = naming.server_name(self.server, field="server") if self.server is not None else None
        name = _name_pattern(self.name) if self.name is not None else None
        description = self.description.strip()
        if len(description) > DESCRIPTION_MAX_CHARS:
            raise ValidationFailed(
                f"description must be at most {DESCRIPTION_MAX_CHARS} characters", field="description"
            )
        return PolicyRule(self.id, effect, kind, subject, self.gateway_id, server, name, description)


@dataclass(frozen=True, slots=True)
class Subject:
    """The caller, as policy sees it."""

    member_id: str
    member_email: str
    role: str
    host_id: str
    host_name: str


@dataclass(frozen=True, slots=True)
class Target:
    """What is asked for: a tool, prompt or resource of one server in one gateway."""

    gateway_id: str
    server: str
    name: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule_id: str | None  # the rule that decided; None when no rule applied
    reason: str


def decide(rules: Sequence[PolicyRule], subject: Subject, target: Target) -> Decision:
    """Deny wins; with no deny, an allow rule scoped to the target admits only the subjects it names."""
    scoped = [rule for rule in rules if applies(rule, target)]
    denies = [rule for rule in scoped if rule.effect == Effect.DENY and matches(rule, subject)]
    if denies:
        rule = _most_specific(denies)
        return Decision(False, rule.id, f"denied by policy rule {rule.id}: {rule.description or summary(rule)}")
    allows = [rule for rule in scoped if rule.effect == Effect.ALLOW]
    if not allows:
        return Decision(True, None, "no policy rule applies")
    admitting = [rule for rule in allows if matches(rule, subject)]
    if not admitting:
        # Allow rules scoped to a target make it an allow-list: whoever they do not name is refused.
        return Decision(False, None, f"not allowed by any policy rule for {target.server}/{target.name}")
    rule = _most_specific(admitting)
    return Decision(True, rule.id, f"allowed by policy rule {rule.id}: {rule.description or summary(rule)}")


def applies(rule: PolicyRule, target: Target) -> bool:
    """Whether ``rule`` is scoped to ``target``: each of its gateway, server and name is unset or fits."""
    return (
        (rule.gateway_id is None or rule.gateway_id == target.gateway_id)
        and (rule.server is None or rule.server == target.server)
        and (rule.name is None or fnmatch.fnmatchcase(target.name, rule.name))
    )


def matches(rule: PolicyRule, subject: Subject) -> bool:
    """Whether ``rule`` names ``subject``; member emails compare case-insensitively."""
    match rule.subject_kind:
        case SubjectKind.ANY:
            return True
        case SubjectKind.MEMBER:
            return rule.subject is not None and (
                rule.subject == subject.member_id or rule.subject.casefold() == subject.member_email.casefold()
            )
        case SubjectKind.ROLE:
            return rule.subject == subject.role
        case SubjectKind.HOST:
            return rule.subject is not None and rule.subject in (subject.host_id, subject.host_name)


def summary(rule: PolicyRule) -> str:
    """A readable one-liner: ``deny role viewer on github/delete_* in gateway g1``."""
    who = "anyone" if rule.subject_kind == SubjectKind.ANY else f"{rule.subject_kind} {rule.subject}"
    where = f"in gateway {rule.gateway_id}" if rule.gateway_id is not None else "in every gateway"
    return f"{rule.effect} {who} on {rule.server or '*'}/{rule.name or '*'} {where}"


def _most_specific(rules: Iterable[PolicyRule]) -> PolicyRule:
    # The full tie-break chain keeps the choice independent of rule order even if two rules share an id.
    return min(rules, key=lambda r: (-_specificity(r), r.id, summary(r), r.description))


def _specificity(rule: PolicyRule) -> int:
    score = 0
    if rule.subject_kind != SubjectKind.ANY:
        score += 8
    if rule.gateway_id is not None:
        score += 4
    if rule.server is not None:
        score += 2
    if rule.name is not None:
        score += 1 if _GLOB_CHARS.intersection(rule.name) else 2
    return score


_SUBJECT_HINT: Final = {
    SubjectKind.MEMBER: "member's id or email",
    SubjectKind.ROLE: "role's name",
    SubjectKind.HOST: "host's id or name",
}


def _subject(kind: SubjectKind, value: str | None) -> str | None:
    if kind is SubjectKind.ANY:
        if value is not None and value.strip():
            raise ValidationFailed("a rule for anyone names no subject", field="subject")
        return None
    cleaned = (value or "").strip()
    if not cleaned:
        raise ValidationFailed(f"a {kind.value} rule needs a subject: the {_SUBJECT_HINT[kind]}", field="subject")
    if len(cleaned) > SUBJECT_MAX_CHARS or any(ord(ch) < 32 for ch in cleaned):
        raise ValidationFailed(f"subject must be 1-{SUBJECT_MAX_CHARS} printable characters", field="subject")
    return cleaned


def _name_pattern(value: str) -> str:
    if not value or len(value) > NAME_PATTERN_MAX_CHARS or any(ord(ch) < 32 for ch in value):
        raise ValidationFailed(
            f"name must be 1-{NAME_PATTERN_MAX_CHARS} printable characters (a name or a pattern like delete_*); "
            "leave it out to mean everything",
            field="name",
        )
    return value
