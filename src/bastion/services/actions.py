"""One audit event per admin or member action, written by the same transaction as the change it records."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.context import request_id_var
from bastion.db.audit import record
from bastion.domain.actor import Actor
from bastion.domain.audit import AuditEvent
from bastion.domain.ids import new_id
from bastion.types import JSONObject


def action(conn: AsyncConnection, actor: Actor, name: str, target: str, detail: JSONObject | None = None) -> None:
    """Record that ``actor`` did ``name`` (e.g. "host.disabled") to ``target`` (e.g. "host:<id>").

    ``detail`` names what changed (field names, new non-secret values); never a secret or token.
    """
    record(
        conn,
        AuditEvent(
            id=new_id(),
            occurred_at=datetime.now(UTC),
            kind="admin",
            method=name,
            outcome="ok",
            workspace=actor.workspace_id,
            correlation_id=request_id_var.get(),
            member_id=actor.member_id,
            actor=actor.label,
            target=target,
            detail=detail,
        ),
    )
