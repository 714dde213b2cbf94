"""`bastion role …`: sets of capabilities members hold. The owner role is locked."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import emit_json, emit_many, emit_one, success
from bastion.domain.capabilities import CAPABILITY_LABELS, parse_capabilities
from bastion.domain.models import Role
from bastion.domain.specs import RoleSpec
from bastion.errors import ValidationFailed
from bastion.services import roles
from bastion.web.api.schemas import RoleOut

role_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("name", "builtin", "capabilities", "id")
Ref = Annotated[str, typer.Argument(help="Role name or id.")]
Capabilities = Annotated[
    list[str] | None, typer.Option("--capability", "-c", help="A capability, e.g. hosts.disable_enable (repeat).")
]


def record(role: Role) -> dict[str, Any]:
    return RoleOut.of(role).model_dump(mode="json")


@role_app.command("capabilities")
def capabilities(json_out: JsonFlag = False) -> None:
    """List every capability a role can hold."""
    docs = [{"name": c.value, "label": label} for c, label in CAPABILITY_LABELS.items()]
    emit_many(docs, json_out, ("name", "label"), title="Capabilities")


@role_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Slug-like name, e.g. auditor.")],
    capability: Capabilities = None,
    description: Annotated[str, typer.Option(help="What the role is for.")] = "",
    json_out: JsonFlag = False,
) -> None:
    """Create a custom role."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        spec = RoleSpec(name, description, parse_capabilities(capability or []))
        return record(await roles.create(ctx.store, ctx.actor, spec))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"created role {doc['name']}")


@role_app.command("list")
def list_(json_out: JsonFlag = False) -> None:
    """List roles, built-in ones included."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: roles.list_page(ctx.store, ctx.actor, cursor=c, limit=n))
        return [record(r) for r in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Roles")


@role_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one role."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await roles.get(ctx.store, ctx.actor, ref))

    emit_one(run_with(body), json_out)


@role_app.command("update")
def update(
    ref: Ref,
    name: Annotated[str | None, typer.Option(help="New name (custom roles only).")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    capability: Annotated[
        list[str] | None, typer.Option("--capability", "-c", help="Replace the whole set with these (repeat).")
    ] = None,
    add: Annotated[list[str] | None, typer.Option("--add", help="Grant this capability too (repeat).")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="Take this capability away (repeat).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only what is given; --capability replaces the set, --add and --remove edit it."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        changes: dict[str, Any] = {k: v for k, v in {"name": name, "description": description}.items() if v is not None}
        version: int | None = None
        if capability is not None and (add or remove):
            raise ValidationFailed("give either --capability or --add/--remove", field="capabilities")
        if capability is not None:
            changes["capabilities"] = parse_capabilities(capability)
        elif add or remove:
            current = await roles.get(ctx.store, ctx.actor, ref)
            version = current.version
            changes["capabilities"] = (current.capabilities | parse_capabilities(add or [])) - parse_capabilities(
                remove or []
            )
        if not changes:
            raise ValidationFailed("nothing to update: give --name, --description, --capability, --add or --remove")
        return record(await roles.update(ctx.store, ctx.actor, ref, changes, version))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated role {doc['name']}")


@role_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Delete a custom role no member holds."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        role = await roles.get(ctx.store, ctx.actor, ref)
        await roles.delete(ctx.store, ctx.actor, role.id)
        return {"deleted": True, "id": role.id, "name": role.name}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted role {doc['name']}")
