"""`bastion gateway …`: named sets of servers behind one URL, /g/{slug}/mcp."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag, key_values
from bastion.cli.output import emit_json, emit_record, emit_table, success
from bastion.domain.models import Gateway, IdentityScheme, Provisioning, ProvisionMode
from bastion.domain.specs import GatewayServerSpec, GatewaySpec
from bastion.errors import ValidationFailed
from bastion.services import gateways
from bastion.web.api.schemas import GatewayCreate, GatewayOut, GatewayUpdate

gateway_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("slug", "name", "enabled", "servers", "url_path", "id")
SERVER_COLUMNS = ("alias", "server", "identity_scheme", "shared_identity_id", "tools", "prompts", "resources")
Ref = Annotated[str, typer.Argument(help="Gateway slug or id.")]
File = Annotated[
    Path | None,
    typer.Option("--file", "-f", exists=True, dir_okay=False, help="JSON body as for the REST API (POST/PATCH)."),
]
Servers = Annotated[
    list[str] | None, typer.Option("--server", "-s", help="NAME or NAME:ALIAS; per-user, everything allowed (repeat).")
]
Shared = Annotated[
    list[str] | None,
    typer.Option("--shared", help="ALIAS=IDENTITY_ID: serve ALIAS with one global identity for everyone (repeat)."),
]
Tools = Annotated[list[str] | None, typer.Option("--tools", help="ALIAS=allow_all|block_all|name,name… (repeat).")]
Prompts = Annotated[list[str] | None, typer.Option("--prompts", help="ALIAS=allow_all|block_all|name,name…")]
Resources = Annotated[list[str] | None, typer.Option("--resources", help="ALIAS=allow_all|block_all|uri,uri…")]


def record(gateway: Gateway, spec: GatewaySpec) -> dict[str, Any]:
    return GatewayOut.of(gateway, spec).model_dump(mode="json")


def _provisioning_cell(value: dict[str, Any]) -> str:
    if value["mode"] == ProvisionMode.ALLOW_SELECTED.value:
        return "only " + (", ".join(value["selected"]) or "-")
    return str(value["mode"])


def _emit(doc: dict[str, Any], json_out: bool, message: str | None = None) -> None:
    if json_out:
        emit_json(doc)
        return
    if message:
        success(message)
    emit_record({k: v for k, v in doc.items() if k != "servers"})
    rows = [
        {**s, **{kind: _provisioning_cell(s[kind]) for kind in ("tools", "prompts", "resources")}}
        for s in doc["servers"]
    ]
    emit_table(rows, SERVER_COLUMNS, title="Servers")


def _body(path: Path, model: type[BaseModel]) -> dict[str, Any]:
    """The JSON object in ``path``, checked against the REST body ``model``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationFailed(f"{path.name} is not valid JSON: {exc}", field="file") from None
    if not isinstance(data, dict):
        raise ValidationFailed(f"{path.name} must hold a JSON object", field="file")
    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ValidationFailed(f"{path.name}: {problems}", field="file") from None
    return dict(data)  # type: ignore[arg-type]


def _entries(values: list[str]) -> list[GatewayServerSpec]:
    out: list[GatewayServerSpec] = []
    for value in values:
        server, _, alias = value.partition(":")
        if not server:
            raise ValidationFailed(f"--server takes NAME or NAME:ALIAS, got {value!r}", field="servers")
        out.append(GatewayServerSpec(server, alias or None))
    return out


def _provisioning(value: str) -> Provisioning:
    folded = value.strip().lower()
    if folded in ("allow_all", "all"):
        return Provisioning(ProvisionMode.ALLOW_ALL)
    if folded in ("block_all", "none"):
        return Provisioning(ProvisionMode.BLOCK_ALL)
    return Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset(n.strip() for n in value.split(",") if n.strip()))


def _edit_entries(
    entries: list[GatewayServerSpec],
    shared: list[str] | None,
    tools: list[str] | None,
    prompts: list[str] | None,
    resources: list[str] | None,
) -> list[GatewayServerSpec]:
    """Apply the per-server options, each keyed by the entry's alias (the server name unless aliased)."""
    index = {(e.alias or e.server): i for i, e in enumerate(entries)}

    def at(alias: str, option: str) -> int:
        if alias not in index:
            raise ValidationFailed(f"{option} names {alias!r}, which is not a server of this gateway", field="servers")
        return index[alias]

    out = list(entries)
    for alias, identity in key_values(shared or [], option="--shared").items():
        i = at(alias, "--shared")
        out[i] = replace(out[i], identity_scheme=IdentityScheme.SHARED, shared_identity_id=identity)
    for option, values in (("tools", tools), ("prompts", prompts), ("resources", resources)):
        for alias, value in key_values(values or [], option=f"--{option}").items():
            i = at(alias, f"--{option}")
            out[i] = replace(out[i], **{option: _provisioning(value)})
    return out


def _edits_given(*values: list[str] | None) -> bool:
    return any(v is not None for v in values)


@gateway_app.command("create")
def create(
    slug: Annotated[str | None, typer.Argument(help="URL slug: /g/SLUG/mcp. May come from --file instead.")] = None,
    server: Servers = None,
    shared: Shared = None,
    tools: Tools = None,
    prompts: Prompts = None,
    resources: Resources = None,
    name: Annotated[str | None, typer.Option(help="Display name (default: the slug).")] = None,
    description: Annotated[str | None, typer.Option(help="What the gateway is for.")] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Create it switched off.")] = False,
    file: File = None,
    json_out: JsonFlag = False,
) -> None:
    """Create a gateway, e.g. `gateway create sales --server github --server linear:tickets`."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        data = _body(file, GatewayCreate) if file is not None else {}
        if slug is not None:
            data["slug"] = slug
        if "slug" not in data:
            raise ValidationFailed("give the gateway's SLUG, or a --file with a slug", field="slug")
        base = GatewayCreate.model_validate(data).to_domain()
        entries = _edit_entries([*base.servers, *_entries(server or [])], shared, tools, prompts, resources)
        spec = replace(
            base,
            name=name if name is not None else base.name,
            description=description if description is not None else base.description,
            enabled=base.enabled and not disabled,
            servers=tuple(entries),
        )
        gateway = await gateways.create(ctx.store, ctx.actor, spec)
        return record(*(await gateways.get(ctx.store, ctx.actor, gateway.id)))

    doc = run_with(body)
    _emit(doc, json_out, f"created gateway {doc['slug']} at {doc['url_path']}")


@gateway_app.command("list")
def list_(json_out: JsonFlag = False) -> None:
    """List gateways."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: gateways.list_page(ctx.store, ctx.actor, cursor=c, limit=n))
        return [record(g, s) for g, s in found]

    docs = run_with(body)
    if json_out:
        emit_json(docs)
    else:
        rows = [{**d, "servers": [s["alias"] for s in d["servers"]]} for d in docs]
        emit_table(rows, COLUMNS, title="Gateways")


@gateway_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one gateway with its servers."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(*(await gateways.get(ctx.store, ctx.actor, ref)))

    _emit(run_with(body), json_out)


@gateway_app.command("update")
def update(
    ref: Ref,
    server: Annotated[
        list[str] | None, typer.Option("--server", "-s", help="Replace the servers with these NAME[:ALIAS] (repeat).")
    ] = None,
    clear_servers: Annotated[bool, typer.Option("--clear-servers", help="Remove every server.")] = False,
    shared: Shared = None,
    tools: Tools = None,
    prompts: Prompts = None,
    resources: Resources = None,
    slug: Annotated[str | None, typer.Option(help="New slug (changes the URL).")] = None,
    name: Annotated[str | None, typer.Option(help="New display name.")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable", help="Switch the gateway on or off.")] = None,
    file: File = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only what is given; --server replaces the list, --shared/--tools/… edit entries in place."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        gateway, current = await gateways.get(ctx.store, ctx.actor, ref)
        changes: dict[str, Any] = GatewayUpdate.model_validate(_body(file, GatewayUpdate)).changes() if file else {}
        given = {"slug": slug, "name": name, "description": description, "enabled": enabled}
        changes.update({k: v for k, v in given.items() if v is not None})
        if server is not None or clear_servers:
            changes["servers"] = tuple(_entries(server or []))
        if _edits_given(shared, tools, prompts, resources):
            base = list(changes.get("servers", current.servers))
            changes["servers"] = tuple(_edit_entries(base, shared, tools, prompts, resources))
        if not changes:
            raise ValidationFailed("nothing to update: give at least one option")
        return record(*(await gateways.update(ctx.store, ctx.actor, gateway.id, changes, gateway.version)))

    doc = run_with(body)
    _emit(doc, json_out, f"updated gateway {doc['slug']}")


@gateway_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Delete a gateway. Its URL stops answering."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        gateway, _spec = await gateways.get(ctx.store, ctx.actor, ref)
        await gateways.delete(ctx.store, ctx.actor, gateway.id)
        return {"deleted": True, "id": gateway.id, "slug": gateway.slug}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted gateway {doc['slug']}")
