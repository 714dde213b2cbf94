"""Admin command groups: members, roles, servers, gateways, hosts, API keys."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, run_with
from bastion.cli.main import JsonFlag, app
from bastion.cli.output import emit_json, emit_record, emit_table, success
from bastion.domain.specs import HostSpec
from bastion.services import hosts

host_app = typer.Typer(help="Hosts: the agents that call gateways.", no_args_is_help=True)
app.add_typer(host_app, name="host")

HOST_COLUMNS = ("name", "enabled", "webhook_url", "id", "updated_at")


def _host(h: Any) -> dict[str, Any]:
    return {"id": h.id, "name": h.name, "description": h.description, "kind": h.kind, "enabled": h.enabled,
            "webhook_url": h.webhook_url, "disabled_at": h.disabled_at, "disabled_by": h.disabled_by,
            "version": h.version, "created_at": h.created_at, "updated_at": h.updated_at}


@host_app.command("create")
def host_create(
    name: Annotated[str, typer.Argument(help="Slug-like name, e.g. sales-agent.")],
    description: Annotated[str, typer.Option(help="What this agent is.")] = "",
    webhook_url: Annotated[str | None, typer.Option(help="Where minted tokens are delivered.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Create a token-based host for one headless agent."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return _host(await hosts.create(ctx.store, ctx.actor, HostSpec(name, description, webhook_url)))

    record = run_with(body)
    if json_out:
        emit_json(record)
    else:
        success(f"created host {record['name']}")
        emit_record(record)


@host_app.command("list")
def host_list(json_out: JsonFlag = False) -> None:
    """List hosts."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = await hosts.list_page(ctx.store, ctx.actor, cursor=cursor, limit=200)
            out += [_host(h) for h in page.items]
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    records = run_with(body)
    if json_out:
        emit_json(records)
    else:
        emit_table(records, HOST_COLUMNS, title="Hosts")


def _toggle(name: str, enabled: bool, json_out: bool) -> None:
    async def body(ctx: CliContext) -> dict[str, Any]:
        return _host(await hosts.set_enabled(ctx.store, ctx.actor, name, enabled))

    record = run_with(body)
    if json_out:
        emit_json(record)
    else:
        success(f"host {record['name']} {'enabled' if enabled else 'disabled'}; its tokens were kept")


@host_app.command("disable")
def host_disable(name: Annotated[str, typer.Argument(help="Host name or id.")], json_out: JsonFlag = False) -> None:
    """Block every token of the host at once. Nothing is deleted."""
    _toggle(name, False, json_out)


@host_app.command("enable")
def host_enable(name: Annotated[str, typer.Argument(help="Host name or id.")], json_out: JsonFlag = False) -> None:
    """Let the host's tokens work again."""
    _toggle(name, True, json_out)
