"""How refusals met mid-call reach the MCP wire."""

from __future__ import annotations

from bastion.errors import Unavailable
from bastion.pipeline.errors import AUDIT_RETRY_AFTER_S, AUDIT_UNAVAILABLE, UPSTREAM_UNAVAILABLE, to_jsonrpc
from bastion.services.audit import AuditUnavailable
from bastion.upstream.pool import UpstreamUnavailable


def test_the_database_or_the_audit_log_away_mid_call_is_a_retry_later_not_an_internal_error() -> None:
    for error in (Unavailable("the database is unreachable; try again shortly"), AuditUnavailable("not written")):
        mapped = to_jsonrpc(error).error
        assert mapped.code == AUDIT_UNAVAILABLE, mapped
        assert mapped.data == {"code": error.code, "status": 503, "retryAfter": AUDIT_RETRY_AFTER_S}
        assert mapped.message == error.detail
    upstream = to_jsonrpc(UpstreamUnavailable("the upstream did not answer")).error
    assert upstream.code == UPSTREAM_UNAVAILABLE, upstream
