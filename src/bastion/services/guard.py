"""What every request passes on its way through the gateway: policy, rate limits and content rules.

The rules of a workspace are read once and kept in memory until an admin changes them (a POLICY change event,
carried across replicas by the change listener). Everything decided is noted on the request's audit record.
"""

from __future__ import annotations

import logging
from typing import Any, Final, cast

from pydantic import BaseModel

from bastion.db.store import Store
from bastion.domain import content, policy
from bastion.domain.connections import Principal
from bastion.errors import BastionError
from bastion.events.bus import Changed, Subject
from bastion.services import rules
from bastion.services.audit import current_record
from bastion.services.ratelimits import RateLimiter
from bastion.services.rules import RuleSet
from bastion.types import JSONValue

logger = logging.getLogger("bastion.guard")
MAX_CACHED_WORKSPACES: Final = 1000


class PolicyDenied(BastionError):
    code = "policy_denied"
    status = 403
    title = "Denied by policy"

    def __init__(self, detail: str, rule_id: str | None) -> None:
        super().__init__(detail)
        self.rule_id = rule_id


class RateLimited(BastionError):
    code = "rate_limited"
    status = 429
    title = "Rate limit reached"

    def __init__(self, detail: str, rule_id: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.rule_id = rule_id
        self.retry_after_s = retry_after_s


class ContentBlocked(BastionError):
    code = "content_blocked"
    status = 422
    title = "Blocked by a content rule"

    def __init__(self, detail: str, rule_name: str) -> None:
        super().__init__(detail)
        self.rule_name = rule_name


def subject_of(principal: Principal) -> policy.Subject:
    return policy.Subject(
        member_id=principal.member_id,
        member_email=principal.member_email,
        role=principal.role,
        host_id=principal.host_id,
        host_name=principal.host_name,
    )


class Guard:
    """Applies a workspace's policy, rate limits and content rules to one request at a time."""

    def __init__(self, store: Store, limiter: RateLimiter, hash_key: bytes) -> None:
        self._store = store
        self._limiter = limiter
        self._hash_key = hash_key
        self._cache: dict[str, RuleSet] = {}
        self._generation = 0
        self._unsubscribe = store.bus.subscribe(self._on_change)

    def __repr__(self) -> str:
        return f"Guard(cached_workspaces={len(self._cache)})"

    async def close(self) -> None:
        self._unsubscribe()
        await self._limiter.close()

    def _on_change(self, event: Changed) -> None:
        if event.subject is Subject.POLICY or event.subject is Subject.ALL:
            # Bumped before the cache is dropped: a read that started earlier must not store what it read.
            self._generation += 1
            if event.subject is Subject.ALL:
                self._cache.clear()
            else:
                self._cache.pop(event.id, None)

    async def rules(self, workspace_id: str) -> RuleSet:
        found = self._cache.get(workspace_id)
        if found is None:
            generation = self._generation
            found = await rules.load(self._store, workspace_id)
            if generation == self._generation and self._store.bus.live:
                if len(self._cache) >= MAX_CACHED_WORKSPACES:
                    self._cache.clear()
                self._cache[workspace_id] = found
        return found

    # --- policy ---------------------------------------------------------------------------------------------------

    def visible(self, ruleset: RuleSet, principal: Principal, server: str, name: str) -> bool:
        """Whether a listed item stays in the caller's listing: what policy denies is not shown either."""
        if not ruleset.policies:
            return True
        target = policy.Target(principal.gateway_id, server, name)
        return policy.decide(ruleset.policies, subject_of(principal), target).allowed

    async def admit(self, principal: Principal, server: str, name: str) -> RuleSet:
        """Policy for one routed request; the decision and its reason go on the audit record.

        Raises:
            PolicyDenied: a rule denies it; the error names the rule.
        """
        ruleset = await self.rules(principal.workspace_id)
        decision = policy.decide(
            ruleset.policies, subject_of(principal), policy.Target(principal.gateway_id, server, name)
        )
        record = current_record()
        if record is not None:
            record.server = server
            record.decision = "allow" if decision.allowed else "deny"
            record.reason = decision.reason
        if not decision.allowed:
            if record is not None:
                record.outcome = "denied"
            raise PolicyDenied(decision.reason, decision.rule_id)
        return ruleset

    # --- rate limits ----------------------------------------------------------------------------------------------

    async def count(self, ruleset: RuleSet, principal: Principal, tool: str) -> None:
        """Count a tools/call against the rate limits that apply.

        Raises:
            RateLimited: a limit has no room left; the error says when to retry.
            Unavailable: the shared counter store did not answer (fail closed).
        """
        if not ruleset.limits:
            return
        limited = await self._limiter.hit(
            ruleset.limits,
            member_id=principal.member_id,
            host_id=principal.host_id,
            gateway_id=principal.gateway_id,
            tool=tool,
        )
        if limited is not None:
            record = current_record()
            if record is not None:
                record.outcome, record.reason = "limited", limited.detail
            raise RateLimited(limited.detail, limited.rule_id, limited.retry_after_s)

    # --- content rules --------------------------------------------------------------------------------------------

    def scanned(self, ruleset: RuleSet, principal: Principal) -> frozenset[str]:
        """What the enabled content rules of the caller's gateway read: "arguments", "results", both or neither."""
        read: set[str] = set()
        for rule in content.for_gateway(ruleset.content, principal.gateway_id):
            if rule.enabled:
                both = rule.target is content.ContentTarget.BOTH
                read.update(("arguments", "results") if both else (rule.target.value,))
        return frozenset(read)

    def scan(self, ruleset: RuleSet, principal: Principal, value: Any, where: str) -> Any:
        """``value`` (JSON, or models as their JSON) with the content rules for ``where`` applied; ``value`` itself
        when no rule applies in this gateway.

        Raises:
            ContentBlocked: a blocking rule matched.
        """
        applicable = content.for_gateway(ruleset.content, principal.gateway_id)
        if not applicable:
            return value
        result = content.scan(applicable, as_json(value), where, self._hash_key)
        record = current_record()
        if record is not None:
            record.findings.extend(
                {"rule": f.rule_name, "action": f.action.value, "where": f.where, "count": f.count}
                for f in result.findings
            )
            if where == "arguments":
                record.shown_arguments = result.value
        if result.blocked_by is not None:
            if record is not None:
                record.outcome = "blocked"
                record.reason = f"content rule {result.blocked_by.rule_name!r} blocked the {where}"
            raise ContentBlocked(
                f"the {where} were blocked by the content rule {result.blocked_by.rule_name!r}",
                result.blocked_by.rule_name,
            )
        return result.value


def as_json(value: Any) -> JSONValue:
    """Models as their JSON (wire names, as the caller sees them), containers of them likewise, JSON as it is."""
    if isinstance(value, BaseModel):
        dumped: JSONValue = value.model_dump(mode="json", by_alias=True, exclude_none=True)
        return dumped
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in cast("dict[Any, Any]", value).items()}
    if isinstance(value, list):
        return [as_json(v) for v in cast("list[Any]", value)]
    return cast("JSONValue", value)
