"""`bastion member …`: the people in the workspace and the role each holds."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import console, emit_json, emit_many, emit_one, success, warn
from bastion.domain.models import Member, MemberStatus
from bastion.domain.specs import MemberSpec
from bastion.errors import NotFound, ValidationFailed
from bastion.services import accounts, members, roles
from bastion.services.accounts import TicketKind
from bastion.web.api.schemas import MemberOut

member_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("email", "name", "role", "status", "id")
Ref = Annotated[str, typer.Argument(help="Member email or id.")]


def record(member: Member, role_name: str) -> dict[str, Any]:
    """The API's member document plus the role's name."""
    return {**MemberOut.from_domain(member).model_dump(mode="json"), "role": role_name}


async def _with_role(ctx: CliContext, member: Member) -> dict[str, Any]:
    return record(member, (await roles.get(ctx.store, ctx.actor, member.role_id)).name)


@member_app.command("create")
def create(
    email: Annotated[str, typer.Argument(help="The member's email address.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the part before @).")] = None,
    role: Annotated[str, typer.Option(help="Role name or id.")] = "member",
    json_out: JsonFlag = False,
) -> None:
    """Add a member holding one role."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        spec = MemberSpec(email, name if name is not None else email.split("@")[0], role)
        return await _with_role(ctx, await members.create(ctx.store, ctx.actor, spec))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"created member {doc['email']} ({doc['role']})")


@member_app.command("list")
def list_(
    status: Annotated[MemberStatus | None, typer.Option(help="Only members with this status.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """List members."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        all_roles = await all_pages(lambda c, n: roles.list_page(ctx.store, ctx.actor, cursor=c, limit=n))
        names = {r.id: r.name for r in all_roles}
        found = await all_pages(lambda c, n: members.list_page(ctx.store, ctx.actor, cursor=c, limit=n, status=status))
        return [record(m, names.get(m.role_id, m.role_id)) for m in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Members")


@member_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one member."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return await _with_role(ctx, await members.get(ctx.store, ctx.actor, ref))

    emit_one(run_with(body), json_out)


@member_app.command("update")
def update(
    ref: Ref,
    email: Annotated[str | None, typer.Option(help="New email address.")] = None,
    name: Annotated[str | None, typer.Option(help="New display name.")] = None,
    role: Annotated[str | None, typer.Option(help="New role name or id.")] = None,
    status: Annotated[MemberStatus | None, typer.Option(help="active, or disabled to block their keys.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only the fields given."""
    given = {"email": email, "name": name, "role": role, "status": status}
    changes = {k: v for k, v in given.items() if v is not None}

    async def body(ctx: CliContext) -> dict[str, Any]:
        if not changes:
            raise ValidationFailed("nothing to update: give --email, --name, --role or --status")
        return await _with_role(ctx, await members.update(ctx.store, ctx.actor, ref, changes))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated member {doc['email']}")


@member_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Remove a member. The last active owner cannot be removed."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        member = await members.get(ctx.store, ctx.actor, ref)
        await members.delete(ctx.store, ctx.actor, member.id, revoker=ctx.revoker())
        return {"deleted": True, "id": member.id, "email": member.email}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted member {doc['email']}")


def _ticket_command(ref: str, kind: TicketKind, create: bool, name: str | None, role: str, json_out: bool) -> None:
    async def body(ctx: CliContext) -> dict[str, Any]:
        if create and kind is TicketKind.INVITE:
            try:
                await members.get(ctx.store, ctx.actor, ref)
            except NotFound:
                spec = MemberSpec(ref, name if name is not None else ref.split("@")[0], role)
                await members.create(ctx.store, ctx.actor, spec)
        ticket, secret = await accounts.issue_ticket(ctx.store, ctx.hasher, ctx.actor, ref, kind)
        base = ctx.settings.base_url
        return {
            "member": ticket.member_id,
            "email": ticket.email,
            "kind": ticket.kind.value,
            "expires_at": ticket.expires_at.isoformat(),
            "url": accounts.ticket_url(base, secret),
        }

    doc = run_with(body)
    if json_out:
        emit_json(doc)
        return
    what = "an invitation" if kind is TicketKind.INVITE else "a password reset link"
    success(f"made {what} for {doc['email']}, valid until {doc['expires_at']}; older ones stop working")
    warn("the link below is shown once and works once; hand it to them now")
    console.print(doc["url"], markup=False, highlight=False, soft_wrap=True)


@member_app.command("invite")
def invite(
    ref: Annotated[str, typer.Argument(help="Member email or id.")],
    create: Annotated[bool, typer.Option(help="Add the member first if the email is not one yet.")] = True,
    name: Annotated[str | None, typer.Option(help="Display name for a new member (default: before the @).")] = None,
    role: Annotated[str, typer.Option(help="Role for a new member.")] = "member",
    json_out: JsonFlag = False,
) -> None:
    """Print a link (7 days, single use) through which the member sets their password."""
    _ticket_command(ref, TicketKind.INVITE, create, name, role, json_out)


@member_app.command("reset-link")
def reset_link(ref: Ref, json_out: JsonFlag = False) -> None:
    """Print a link (1 hour, single use) through which the member chooses a new password; it signs them out."""
    _ticket_command(ref, TicketKind.RESET, False, None, "member", json_out)
