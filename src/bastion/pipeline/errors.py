"""The one place Bastion's refusals and failures become JSON-RPC errors on the MCP wire, whichever relay met them."""

from __future__ import annotations

import logging
from typing import Any, Final

import mcp_types as types
from mcp.shared.exceptions import MCPError

from bastion.errors import BastionError, NotFound, Unavailable, ValidationFailed
from bastion.net.outbound import UrlRefused
from bastion.pipeline.frames import MAX_ANSWER_BYTES
from bastion.services.audit import AuditUnavailable, CallRecord
from bastion.services.directory import Mounted
from bastion.services.guard import ContentBlocked, PolicyDenied, RateLimited
from bastion.services.proxy import IdentityNeedsReauth, IdentityRequired
from bastion.upstream.pool import UpstreamBusy, UpstreamUnavailable, refused_by

logger = logging.getLogger("bastion.mcp")
UNAUTHORIZED: Final = 401

# Implementation-defined JSON-RPC server errors (-32000..-32099) for what only a gateway can say.
IDENTITY_REQUIRED: Final = -32050
IDENTITY_NEEDS_REAUTH: Final = -32051
UPSTREAM_UNAVAILABLE: Final = -32052
REQUEST_TIMEOUT: Final = -32001
AUDIT_UNAVAILABLE: Final = -32053
POLICY_DENIED: Final = -32054
RATE_LIMITED: Final = -32055
CONTENT_BLOCKED: Final = -32056
AUDIT_RETRY_AFTER_S: Final = 5


def to_jsonrpc(error: BaseException) -> MCPError:
    """The one place Bastion errors become JSON-RPC errors on the MCP wire."""
    if isinstance(error, MCPError):
        return error
    if isinstance(error, IdentityRequired):
        return MCPError(IDENTITY_REQUIRED, error.detail, {"code": error.code})
    if isinstance(error, IdentityNeedsReauth):
        data: dict[str, Any] = {"code": error.code}
        if error.reconnect is not None:
            data["reconnect"] = error.reconnect  # where the member connects the identity again
        return MCPError(IDENTITY_NEEDS_REAUTH, error.detail, data)
    if isinstance(error, AuditUnavailable):
        # The HTTP equivalent is 503 with Retry-After; on the MCP wire the request gets its own error.
        return MCPError(
            AUDIT_UNAVAILABLE, error.detail, {"code": error.code, "status": 503, "retryAfter": AUDIT_RETRY_AFTER_S}
        )
    if isinstance(error, PolicyDenied):
        return MCPError(POLICY_DENIED, error.detail, {"code": error.code, "rule": error.rule_id})
    if isinstance(error, RateLimited):
        data = {"code": error.code, "rule": error.rule_id, "retryAfter": error.retry_after_s, "status": 429}
        return MCPError(RATE_LIMITED, error.detail, data)
    if isinstance(error, ContentBlocked):
        return MCPError(CONTENT_BLOCKED, error.detail, {"code": error.code, "rule": error.rule_name})
    if isinstance(error, UpstreamBusy):
        data = {"code": error.code, "status": 503, "retryAfter": error.retry_after_s}
        return MCPError(UPSTREAM_UNAVAILABLE, error.detail, data)
    if isinstance(error, UpstreamUnavailable):
        return MCPError(UPSTREAM_UNAVAILABLE, error.detail, {"code": error.code})
    if isinstance(error, Unavailable):
        # Bastion's own database met mid-call (an outage that began after the door let the call in): a retry
        # later, as for the audit log, not a -32603.
        return MCPError(
            AUDIT_UNAVAILABLE, error.detail, {"code": error.code, "status": 503, "retryAfter": AUDIT_RETRY_AFTER_S}
        )
    if isinstance(error, NotFound) and error.field == "uri":
        return MCPError(
            types.INVALID_PARAMS, "Resource not found", {"uri": error.detail.removeprefix("Resource not found: ")}
        )
    if isinstance(error, ValidationFailed | NotFound):
        return MCPError(types.INVALID_PARAMS, error.detail, {"code": error.code})
    if isinstance(error, BastionError):
        return MCPError(types.INTERNAL_ERROR, error.detail, {"code": error.code})
    if isinstance(error, TimeoutError):
        return MCPError(REQUEST_TIMEOUT, "the upstream server did not answer in time", {"code": "upstream_timeout"})
    logger.exception("unexpected error in an MCP handler", exc_info=error)
    return MCPError(types.INTERNAL_ERROR, "internal error; the request id identifies it in the logs")


def upstream_failure(exc: OSError | UrlRefused | TimeoutError, mounted: Mounted, record: CallRecord) -> types.ErrorData:
    """Record an unreachable or too slow upstream on ``record``; the JSON-RPC error the caller gets for it."""
    logger.info("upstream error", extra={"server": mounted.alias, "error": type(exc).__name__})
    if isinstance(exc, TimeoutError):
        record.outcome, record.reason, record.upstream_status = "error", "upstream_timeout", "timeout"
        return to_jsonrpc(exc).error
    reason = f": {exc.detail}" if isinstance(exc, UrlRefused) else ""
    return unavailable(mounted, record, f"is unavailable{reason}")


def unavailable(
    mounted: Mounted, record: CallRecord, what: str, upstream_status: str = "unavailable"
) -> types.ErrorData:
    """Record on ``record`` that upstream ``mounted`` gave no result (``what`` says how: "is unavailable", ...)
    and, where it answered, with which status; the JSON-RPC error the caller gets for it."""
    record.outcome, record.reason, record.upstream_status = "error", "upstream_unavailable", upstream_status
    message = f"upstream {mounted.alias!r} {what}"
    return types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message, data={"code": "upstream_unavailable"})


def answer_too_large(mounted: Mounted, record: CallRecord) -> types.ErrorData:
    """Record an answer too large to hold on ``record``; the JSON-RPC error the caller gets for it."""
    record.outcome, record.reason = "error", "upstream_answer_too_large"
    message = f"the answer of upstream {mounted.alias!r} is larger than {MAX_ANSWER_BYTES} bytes"
    return types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message)


def refused(mounted: Mounted, record: CallRecord, status: int = UNAUTHORIZED) -> types.ErrorData:
    """Record on ``record`` that the upstream refused the member's credential (401) or the call (403) and nothing
    renewed it; the JSON-RPC error the caller gets for it (the full path's ``Proxy`` says the same)."""
    error = refused_by(mounted.alias, status)
    record.outcome, record.reason, record.upstream_status = "error", error.code, str(status)
    return to_jsonrpc(error).error
