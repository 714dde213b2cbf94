"""The admin API's OpenAPI document says how each operation fails, as it really does: problem+json.

FastAPI documents a route's success and a 422 shaped as its own validation error (``application/json``), while
every error Bastion answers is an RFC 9457 problem (``application/problem+json``, web/problems.py). `document`
adds the ``Problem`` schema and, per operation, the statuses its requests can meet: any request can be
unauthenticated (401), lack the capability (403), carry invalid input (422) or meet the database away (503); a
body can be unparseable (400); one naming a resource (in its path, a filter or its body) can find none (404); a
change can conflict (409) or, with ``If-Match``, be stale (412).
Schemathesis holds the document to the answers (tests/web/test_api_schema.py).
"""

from __future__ import annotations

from typing import Any, Final

PROBLEM: Final = "application/problem+json"
_REF: Final = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_SCHEMA: Final = {
    "title": "Problem",
    "type": "object",
    "description": "An RFC 9457 problem; `code` is stable and names the error, `detail` explains this one.",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "request_id": {"type": "string"},
        "field": {"type": "string", "description": "The input the problem is about, when it is about one."},
        "errors": {
            "type": "array",
            "description": "Each invalid input, when the request failed validation.",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
_ALWAYS: Final = {
    "401": "No valid API key (`Authorization: Bearer bsk_…`)",
    "403": "The key's member lacks the capability this needs",
    "422": "Invalid input: `field` (or `errors`) names it",
    "503": "The database is unavailable; retry after `Retry-After`",
}
_BODY: Final = {"400": "The body could not be parsed as JSON"}
_NAMED: Final = {"404": "Nothing by a name or id the request gives"}
_CHANGES: Final = {"409": "Conflicts with what exists (a name taken, a resource in use)"}
_VERSIONED: Final = {"412": "`If-Match` names a version that is no longer current"}


NO_NUL: Final = r"^[^\x00]*$"


def _no_nul(schema: dict[str, Any]) -> None:
    """A text parameter holds no NUL (web/api/deps.plain_parameters refuses it)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string" and not {"pattern", "enum", "const"} & option.keys():
            option["pattern"] = NO_NUL


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (FastAPI's document, changed in place) with every operation's problem responses."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = _PROBLEM_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            statuses = dict(_ALWAYS)
            if "requestBody" in operation:
                statuses |= _BODY
            if "{" in path or operation.get("parameters") or "requestBody" in operation:
                statuses |= _NAMED  # a path, a filter or a body naming something that is not there
            if method in ("post", "put", "patch", "delete"):
                statuses |= _CHANGES
            if method in ("put", "patch", "delete"):
                statuses |= _VERSIONED
            for parameter in operation.get("parameters", []):
                _no_nul(parameter.get("schema", {}))
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status, description in statuses.items():
                responses[status] = {"description": description, "content": {PROBLEM: {"schema": _REF}}}
    schema["components"]["schemas"].pop("HTTPValidationError", None)
    schema["components"]["schemas"].pop("ValidationError", None)
    return schema
