"""Audit routes: the workspace's audit events, listed, read one by one, and exported as a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import StreamingResponse

from bastion.domain.capabilities import Capability as C
from bastion.services import audit_query
from bastion.services.audit_query import AuditFilter, ExportFormat
from bastion.web.api.deps import AuditCursor, Ctx, CurrentActor, Limit, needs
from bastion.web.api.schemas import Moment, PageOut
from bastion.web.api.schemas_audit import AuditEventOut

router = APIRouter()
EventId = Annotated[str, Path(min_length=1, max_length=64)]
_VIEW: Final = needs(C.AUDIT_VIEW_EXPORT)
MEDIA_TYPES: Final[dict[str, str]] = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def audit_filter(
    member: Annotated[str | None, Query(max_length=320, description="Member id or email (or recorded actor)")] = None,
    host: Annotated[str | None, Query(max_length=63, description="Host name or id")] = None,
    gateway: Annotated[str | None, Query(max_length=63, description="Gateway slug")] = None,
    server: Annotated[str | None, Query(max_length=63, description="Server name as the gateway calls it")] = None,
    name: Annotated[str | None, Query(max_length=512, description="Tool, prompt or resource name")] = None,
    outcome: Annotated[str | None, Query(max_length=16, description="ok, error, refused, denied, …")] = None,
    method: Annotated[str | None, Query(max_length=64, description="MCP method or admin action")] = None,
    kind: Annotated[str | None, Query(max_length=8, description="mcp or admin")] = None,
    since: Annotated[Moment | None, Query(description="From this time on (inclusive; no zone = UTC)")] = None,
    until: Annotated[Moment | None, Query(description="Before this time (exclusive; no zone = UTC)")] = None,
) -> AuditFilter:
    return AuditFilter(member, host, gateway, server, name, outcome, method, kind, since, until)


Filter = Annotated[AuditFilter, Depends(audit_filter)]


@router.get("/audit/events", tags=["audit"], openapi_extra=_VIEW)
async def list_audit_events(
    ctx: Ctx, actor: CurrentActor, flt: Filter, cursor: AuditCursor = None, limit: Limit = None
) -> PageOut[AuditEventOut]:
    """The workspace's audit events, newest first; pending ones (no seq yet) included."""
    page = await audit_query.list_page(await ctx.settled(), actor, flt, cursor, limit)
    return PageOut(items=[AuditEventOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/audit/events/{event_id}", tags=["audit"], openapi_extra=_VIEW)
async def get_audit_event(ctx: Ctx, actor: CurrentActor, event_id: EventId) -> AuditEventOut:
    return AuditEventOut.of(await audit_query.get(await ctx.settled(), actor, event_id))


_EXPORT_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "One event per line (JSON Lines), or CSV with a header line; oldest first",
        "content": {media.split(";")[0]: {"schema": {"type": "string"}} for media in MEDIA_TYPES.values()},
    }
}


@router.get(
    "/audit/export",
    tags=["audit"],
    openapi_extra=_VIEW,
    response_class=StreamingResponse,
    responses=_EXPORT_RESPONSES,
)
async def export_audit_events(
    ctx: Ctx,
    actor: CurrentActor,
    flt: Filter,
    fmt: Annotated[ExportFormat, Query(alias="format", description="jsonl or csv")] = "jsonl",
) -> StreamingResponse:
    """The workspace's audit events, streamed: JSON Lines keep every stored value, CSV is for spreadsheets."""
    chunks = audit_query.export(await ctx.settled(), actor, flt, fmt)
    # The first chunk is read here, so a refusal is still a problem+json answer rather than a broken stream.
    first = await anext(chunks, None)

    async def body() -> AsyncIterator[str]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        body(),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="bastion-audit-{stamp}.{fmt}"'},
    )
