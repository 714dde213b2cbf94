"""Schemathesis hooks for tests/web/test_api_schema.py (loaded through SCHEMATHESIS_HOOKS).

These generated requests are left out, because what decides them is not in the request:
- a positive case setting an expiry outside the next ten years: the document cannot say "in the future", which
  depends on the clock (the services' own tests refuse such expiries);
- a positive case giving a content rule a pattern that Python cannot compile or that matches empty text: the
  JSON Schema's `format: regex` means ECMA 262 regular expressions, and no keyword says more;
- a positive case creating or changing a gateway whose servers share an alias (or a server name standing for
  it), or where more than one offers its names without a prefix: the document cannot relate the items of a list;
- a negative case that leaves out a property the document does not require. Schemathesis's coverage phase treats
  every declared property of a referenced body schema as required when it builds negative cases, so it expects
  the API to refuse, say, a partial update that leaves a field alone. The document is right; the case is not.
Every other generated request is sent and checked.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import schemathesis
from schemathesis.generation.meta import CoveragePhaseData, CoverageScenario

EXPIRY_FIELDS: Final = ("expires_at", "token_expires_at")
LONGEST_EXPIRY: Final = timedelta(days=3650)


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    del context
    meta = case.meta
    if meta is None or not isinstance(case.body, dict):
        return True
    body: dict[str, Any] = case.body
    if meta.generation.mode.is_positive:
        if "content-rules" in case.path and not _usable_pattern(body.get("pattern")):
            return False
        if case.path.startswith("/gateways") and not _servers_fit_together(body.get("servers")):
            return False
        return not any(_out_of_reach(body.get(field)) for field in EXPIRY_FIELDS)
    data = meta.phase.data
    if isinstance(data, CoveragePhaseData) and data.scenario is CoverageScenario.OBJECT_MISSING_REQUIRED_PROPERTY:
        return data.parameter in _required(case)
    return True


def _servers_fit_together(servers: object) -> bool:
    if not isinstance(servers, list):
        return True
    entries = [s for s in servers if isinstance(s, dict)]
    aliases = [s.get("alias") or s.get("server") for s in entries]
    unprefixed = [s for s in entries if s.get("namespaced") is False]
    return len(aliases) == len(set(aliases)) and len(unprefixed) <= 1


def _usable_pattern(value: object) -> bool:
    if not isinstance(value, str):
        return True  # left out, or the case's own problem
    try:
        return re.compile(value).search("") is None
    except (re.error, RecursionError, OverflowError):
        return False


def _out_of_reach(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return False
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    return not now < moment < now + LONGEST_EXPIRY


def _required(case: schemathesis.Case) -> list[str]:
    """The properties the operation's JSON body schema requires at its top level."""
    document: dict[str, Any] = case.operation.schema.raw_schema
    schema: dict[str, Any] = case.operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    while "$ref" in schema:
        *_, name = schema["$ref"].split("/")
        schema = document["components"]["schemas"][name]
    return list(schema.get("required", []))
