"""`bastion server …`: the upstream MCP servers gateways are built from."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.importing import import_
from bastion.cli.options import JsonFlag, key_values
from bastion.cli.output import emit_json, emit_one, emit_table, success
from bastion.domain.models import AuthKind, OAuthClientSettings, OAuthRegistration, ProtocolEra, Server, Transport
from bastion.domain.specs import ServerSpec
from bastion.errors import ValidationFailed
from bastion.services import servers
from bastion.web.api.schemas import ServerOut

server_app = typer.Typer(no_args_is_help=True, add_completion=False)
server_app.command("import")(import_)

COLUMNS = ("name", "transport", "target", "auth_kind", "era", "id")
Ref = Annotated[str, typer.Argument(help="Server name or id.")]
Url = Annotated[str | None, typer.Option(help="Endpoint of a streamable HTTP or SSE server.")]
TransportOpt = Annotated[
    Transport | None, typer.Option(help="Default: stdio with --command, streamable_http with --url.")
]
Command = Annotated[str | None, typer.Option(help="Executable of a stdio server, e.g. npx.")]
Args = Annotated[list[str] | None, typer.Option("--arg", help="One argument of the command (repeat, in order).")]
Env = Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the command's environment (repeat).")]
TokenEnv = Annotated[
    str | None,
    typer.Option(
        "--token-env",
        metavar="NAME",
        help="stdio: the variable the command reads each person's token from (default BASTION_BEARER_TOKEN).",
    ),
]
Description = Annotated[str | None, typer.Option(help="What the server does.")]
AuthKindOpt = Annotated[AuthKind | None, typer.Option(help="How each person's credential is presented.")]
Era = Annotated[ProtocolEra | None, typer.Option(help="MCP protocol era to speak upstream.")]
ConnectTimeout = Annotated[float | None, typer.Option("--connect-timeout", help="Seconds to connect.")]
CallTimeout = Annotated[float | None, typer.Option("--call-timeout", help="Seconds a call may take.")]
Registration = Annotated[
    OAuthRegistration | None,
    typer.Option(
        "--oauth-registration", help="How Bastion is known to the OAuth server (auto: the MCP specification's order)."
    ),
]
ClientId = Annotated[str | None, typer.Option("--oauth-client-id", help="Pre-registered OAuth client id.")]
Scopes = Annotated[list[str] | None, typer.Option("--oauth-scope", help="OAuth scope to request (repeat).")]
AuthServer = Annotated[
    str | None, typer.Option("--oauth-authorization-server", help="Issuer URL, when discovery cannot find it.")
]


def record(server: Server) -> dict[str, Any]:
    return ServerOut.of(server).model_dump(mode="json")


def _row(doc: dict[str, Any]) -> dict[str, Any]:
    target = doc["url"] if doc["url"] else " ".join([doc["command"] or "", *doc["args"]])
    return {**doc, "target": target}


def emit_servers(docs: list[dict[str, Any]], json_out: bool) -> None:
    if json_out:
        emit_json(docs)
    else:
        emit_table([_row(d) for d in docs], COLUMNS, title="Servers")


def _oauth(
    base: OAuthClientSettings | None,
    registration: OAuthRegistration | None,
    client_id: str | None,
    scopes: list[str] | None,
    authorization_server: str | None,
) -> OAuthClientSettings | None:
    """``base`` with the OAuth options given applied; None when there is neither."""
    if registration is None and client_id is None and scopes is None and authorization_server is None:
        return base
    start = base or OAuthClientSettings(OAuthRegistration.AUTO)
    return OAuthClientSettings(
        registration or start.registration,
        client_id if client_id is not None else start.client_id,
        tuple(scopes) if scopes is not None else start.scopes,
        authorization_server if authorization_server is not None else start.authorization_server,
    )


@server_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Name, also the tool namespace (server__tool).")],
    url: Url = None,
    transport: TransportOpt = None,
    command: Command = None,
    arg: Args = None,
    env: Env = None,
    token_env: TokenEnv = None,
    description: Description = None,
    auth_kind: AuthKindOpt = None,
    era: Era = None,
    connect_timeout: ConnectTimeout = None,
    call_timeout: CallTimeout = None,
    oauth_registration: Registration = None,
    oauth_client_id: ClientId = None,
    oauth_scope: Scopes = None,
    oauth_authorization_server: AuthServer = None,
    json_out: JsonFlag = False,
) -> None:
    """Add a server: --url URL [--transport sse] for HTTP, or --command CMD --arg A … for stdio."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        if url is not None and command is not None:
            raise ValidationFailed("give --url or --command, not both", field="url")
        kind = transport or (Transport.STDIO if command is not None else Transport.STREAMABLE_HTTP)
        if url is None and command is None:
            raise ValidationFailed("give --url URL (HTTP) or --command CMD (stdio)", field="url")
        oauth = _oauth(None, oauth_registration, oauth_client_id, oauth_scope, oauth_authorization_server)
        spec = ServerSpec(
            name,
            kind,
            url=url,
            command=command,
            args=tuple(arg or ()),
            env=key_values(env or [], option="--env"),
            description=description or "",
            auth_kind=auth_kind or (AuthKind.OAUTH if oauth is not None else AuthKind.NONE),
            oauth=oauth,
            era=era or ProtocolEra.AUTO,
            connect_timeout_s=connect_timeout if connect_timeout is not None else 5.0,
            call_timeout_s=call_timeout if call_timeout is not None else 60.0,
            token_env=token_env or None,
        )
        return record(await servers.create(ctx.store, ctx.actor, spec))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"created server {doc['name']}")


@server_app.command("list")
def list_(
    transport: Annotated[Transport | None, typer.Option(help="Only servers with this transport.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """List servers."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(
            lambda c, n: servers.list_page(ctx.store, ctx.actor, cursor=c, limit=n, transport=transport)
        )
        return [record(s) for s in found]

    emit_servers(run_with(body), json_out)


@server_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one server."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await servers.get(ctx.store, ctx.actor, ref))

    emit_one(run_with(body), json_out)


def _transport_changes(
    current: Server, transport: Transport | None, url: str | None, command: str | None
) -> dict[str, Any]:
    """Switching between HTTP and stdio drops what only the old kind has."""
    changes: dict[str, Any] = {}
    target = transport or (
        Transport.STDIO
        if command is not None
        else (Transport.STREAMABLE_HTTP if url is not None and current.transport is Transport.STDIO else None)
    )
    if target is not None and target is not current.transport:
        changes["transport"] = target
        if target is Transport.STDIO:
            changes["url"] = None
        elif current.transport is Transport.STDIO:
            changes["command"] = None
            changes["args"] = ()
            changes["token_env"] = None
    if url is not None:
        changes["url"] = url
    if command is not None:
        changes["command"] = command
    return changes


@server_app.command("update")
def update(
    ref: Ref,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    url: Url = None,
    transport: TransportOpt = None,
    command: Command = None,
    arg: Annotated[list[str] | None, typer.Option("--arg", help="Replace the arguments with these (repeat).")] = None,
    clear_args: Annotated[bool, typer.Option("--clear-args", help="Remove every argument.")] = False,
    env: Annotated[list[str] | None, typer.Option("--env", help="Replace the environment: KEY=VALUE (repeat).")] = None,
    clear_env: Annotated[bool, typer.Option("--clear-env", help="Remove every environment variable.")] = False,
    token_env: TokenEnv = None,
    clear_token_env: Annotated[
        bool, typer.Option("--clear-token-env", help="Give the token in BASTION_BEARER_TOKEN again.")
    ] = False,
    description: Description = None,
    auth_kind: AuthKindOpt = None,
    era: Era = None,
    connect_timeout: ConnectTimeout = None,
    call_timeout: CallTimeout = None,
    oauth_registration: Registration = None,
    oauth_client_id: ClientId = None,
    oauth_scope: Scopes = None,
    oauth_authorization_server: AuthServer = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only the options given."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        current = await servers.get(ctx.store, ctx.actor, ref)
        changes = _transport_changes(current, transport, url, command)
        plain = {
            "name": name,
            "description": description,
            "auth_kind": auth_kind,
            "era": era,
            "connect_timeout_s": connect_timeout,
            "call_timeout_s": call_timeout,
        }
        changes.update({k: v for k, v in plain.items() if v is not None})
        if arg is not None or clear_args:
            changes["args"] = tuple(arg or ())
        if env is not None or clear_env:
            changes["env"] = key_values(env or [], option="--env")
        if token_env is not None or clear_token_env:
            changes["token_env"] = token_env or None
        oauth = _oauth(current.oauth, oauth_registration, oauth_client_id, oauth_scope, oauth_authorization_server)
        if oauth is not current.oauth:
            changes["oauth"] = oauth
            changes.setdefault("auth_kind", AuthKind.OAUTH)
        elif auth_kind is not None and auth_kind is not AuthKind.OAUTH:
            changes["oauth"] = None
        if not changes:
            raise ValidationFailed("nothing to update: give at least one option")
        return record(await servers.update(ctx.store, ctx.actor, current.id, changes, current.version))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated server {doc['name']}")


@server_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Delete a server no gateway uses."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        server = await servers.get(ctx.store, ctx.actor, ref)
        await servers.delete(ctx.store, ctx.actor, server.id)
        return {"deleted": True, "id": server.id, "name": server.name}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted server {doc['name']}")
