"""REST responses for the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from bastion.services.audit_query import AuditRecord
from bastion.web.api.schemas import Out


class AuditEventOut(Out):
    id: str
    seq: int | None = Field(description="Place in the hash chain; null while the event is pending")
    prev_hash: str | None
    hash: str | None
    occurred_at: datetime
    kind: str = Field(description="mcp (a request through a gateway) or admin (a change to the workspace)")
    method: str = Field(description="MCP method, or the admin action (host.disabled …)")
    outcome: str
    workspace: str | None
    correlation_id: str | None
    member_id: str | None
    actor: str | None
    host_id: str | None
    token_id: str | None
    gateway: str | None
    server: str | None
    name: str | None = Field(description="Tool, prompt or resource name")
    target: str | None
    decision: str | None
    reason: str | None
    upstream_status: str | None
    latency_us: int | None
    args_hmac: str | None
    args_preview: str | None
    detail: dict[str, Any] | None

    @classmethod
    def of(cls, record: AuditRecord) -> AuditEventOut:
        e = record.event
        return cls(
            id=e.id,
            seq=record.seq,
            prev_hash=record.prev_hash,
            hash=record.hash,
            occurred_at=e.occurred_at,
            kind=e.kind,
            method=e.method,
            outcome=e.outcome,
            workspace=e.workspace,
            correlation_id=e.correlation_id,
            member_id=e.member_id,
            actor=e.actor,
            host_id=e.host_id,
            token_id=e.token_id,
            gateway=e.gateway,
            server=e.server,
            name=e.name,
            target=e.target,
            decision=e.decision,
            reason=e.reason,
            upstream_status=e.upstream_status,
            latency_us=e.latency_us,
            args_hmac=e.args_hmac,
            args_preview=e.args_preview,
            detail=e.detail,
        )
