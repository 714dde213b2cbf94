"""Admin routes for local accounts: an invitation link or a password reset link for a member, shown once."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import Field

from bastion.domain.capabilities import Capability as C
from bastion.services import accounts
from bastion.services.accounts import Ticket, TicketKind
from bastion.web.api.deps import Ctx, CurrentActor, link_base, needs
from bastion.web.api.schemas import Out

router = APIRouter()
Ref = Annotated[str, Path(min_length=1, max_length=254, description="Member id or email")]


class TicketCreated(Out):
    member: str = Field(description="The member's id")
    email: str
    kind: TicketKind
    expires_at: datetime
    url: str = Field(description="The link to hand to the member. Single use; shown once.")


def _created(request: Request, ticket: Ticket, secret: str) -> TicketCreated:
    base = link_base(request)
    return TicketCreated(
        member=ticket.member_id,
        email=ticket.email,
        kind=ticket.kind,
        expires_at=ticket.expires_at,
        url=accounts.ticket_url(base, secret),
    )


@router.post("/members/{ref}/invitation", tags=["members"], status_code=201, openapi_extra=needs(C.MEMBERS_MANAGE))
async def invite_member(ctx: Ctx, actor: CurrentActor, ref: Ref, request: Request) -> TicketCreated:
    """A link through which the member sets their password (7 days, single use); older invitations stop working."""
    ticket, secret = await accounts.issue_ticket(ctx.store, ctx.hasher, actor, ref, TicketKind.INVITE)
    return _created(request, ticket, secret)


@router.post("/members/{ref}/password-reset", tags=["members"], status_code=201, openapi_extra=needs(C.MEMBERS_MANAGE))
async def reset_member_password(ctx: Ctx, actor: CurrentActor, ref: Ref, request: Request) -> TicketCreated:
    """A link through which the member chooses a new password (1 hour, single use); it signs them out elsewhere."""
    ticket, secret = await accounts.issue_ticket(ctx.store, ctx.hasher, actor, ref, TicketKind.RESET)
    return _created(request, ticket, secret)
