"""`bastion member …`: the people in the workspace and the role each holds."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import emit_json, emit_many, emit_one, success
from bastion.domain.models import Member, MemberStatus
from bastion.domain.specs import MemberSpec
from bastion.errors import ValidationFailed
from bastion.services import members, roles
from bastion.web.api.schemas import MemberOut

member_app = typer.Typer(help="Members: the people in the workspace.", no_args_is_help=True)

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
        await members.delete(ctx.store, ctx.actor, member.id)
        return {"deleted": True, "id": member.id, "email": member.email}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted member {doc['email']}")
