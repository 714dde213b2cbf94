"""`bastion host …`: the apps and agents that call gateways. Disabling one deletes nothing."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import emit_json, emit_many, emit_one, success
from bastion.domain.models import Host
from bastion.domain.specs import HostSpec
from bastion.errors import ValidationFailed
from bastion.services import hosts
from bastion.web.api.schemas import HostOut

host_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("name", "enabled", "webhook_url", "id", "updated_at")
Ref = Annotated[str, typer.Argument(help="Host name or id.")]


def record(host: Host) -> dict[str, Any]:
    return HostOut.from_domain(host).model_dump(mode="json")


@host_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Slug-like name, e.g. sales-agent.")],
    description: Annotated[str, typer.Option(help="What this agent is.")] = "",
    webhook_url: Annotated[str | None, typer.Option(help="Where minted tokens are delivered.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Create a token-based host for one headless agent."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await hosts.create(ctx.store, ctx.actor, HostSpec(name, description, webhook_url)))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"created host {doc['name']}")


@host_app.command("list")
def list_(
    enabled: Annotated[
        bool | None, typer.Option("--enabled/--disabled", help="Only enabled or disabled hosts.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """List hosts."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: hosts.list_page(ctx.store, ctx.actor, cursor=c, limit=n, enabled=enabled))
        return [record(h) for h in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Hosts")


@host_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one host."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await hosts.get(ctx.store, ctx.actor, ref))

    emit_one(run_with(body), json_out)


@host_app.command("update")
def update(
    ref: Ref,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="New webhook URL; an empty string removes it.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only the options given."""
    changes: dict[str, Any] = {k: v for k, v in {"name": name, "description": description}.items() if v is not None}
    if webhook_url is not None:
        changes["webhook_url"] = webhook_url or None

    async def body(ctx: CliContext) -> dict[str, Any]:
        if not changes:
            raise ValidationFailed("nothing to update: give --name, --description or --webhook-url")
        return record(await hosts.update(ctx.store, ctx.actor, ref, changes))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated host {doc['name']}")


def _toggle(ref: str, enabled: bool, json_out: bool) -> None:
    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await hosts.set_enabled(ctx.store, ctx.actor, ref, enabled))

    doc = run_with(body)
    state = "enabled" if enabled else "disabled"
    emit_one(doc, json_out, message=f"host {doc['name']} {state}; its tokens were kept")


@host_app.command("disable")
def disable(ref: Ref, json_out: JsonFlag = False) -> None:
    """Block every token of the host at once. Nothing is deleted."""
    _toggle(ref, False, json_out)


@host_app.command("enable")
def enable(ref: Ref, json_out: JsonFlag = False) -> None:
    """Let the host's tokens work again."""
    _toggle(ref, True, json_out)


@host_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Delete a host. To stop it for now and keep everything, use `host disable`."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        host = await hosts.get(ctx.store, ctx.actor, ref)
        await hosts.delete(ctx.store, ctx.actor, host.id)
        return {"deleted": True, "id": host.id, "name": host.name}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted host {doc['name']}")
