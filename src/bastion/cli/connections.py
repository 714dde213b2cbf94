"""`bastion connection …`: a member enrolled at a gateway through a host, with an access token shown once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, guarded, run_with
from bastion.cli.names import Names
from bastion.cli.options import JsonFlag, key_values
from bastion.cli.output import console, emit_json, emit_many, emit_one, emit_record, success, warn
from bastion.domain.connections import AccessToken, Connection
from bastion.errors import ValidationFailed
from bastion.services import connections
from bastion.web.api.schemas_identity import AccessTokenOut, ConnectionOut

connection_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("id", "member", "host", "gateway", "enabled", "identities", "created_at")
Ref = Annotated[str, typer.Argument(help="The connection's id (see `connection list`).")]
Expires = Annotated[
    str | None,
    typer.Option("--token-expires", metavar="ISO8601", help="When the token expires (default: never; naive = UTC)."),
]


def record(connection: Connection, names: Names) -> dict[str, Any]:
    """The API's connection document plus the member's email, the host's name and the gateway's slug."""
    return {
        **ConnectionOut.from_domain(connection).model_dump(mode="json"),
        "member": names.member(connection.member_id),
        "host": names.host(connection.host_id),
        "gateway": names.gateway(connection.gateway_id),
    }


def token_record(token: AccessToken) -> dict[str, Any]:
    return AccessTokenOut.of(token).model_dump(mode="json")


def parse_instant(value: str | None, *, option: str) -> datetime | None:
    """An ISO 8601 date or time; without a zone it is read as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationFailed(
            f"{option} takes an ISO 8601 time, e.g. 2030-01-31T12:00:00Z", field="expires_at"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def emit_token_once(doc: dict[str, Any], json_out: bool, *, message: str, record_key: str) -> None:
    """A document carrying an access token: the token goes on its own line, said to be shown once."""
    if json_out:
        emit_json(doc)
        return
    success(message)
    emit_record(doc[record_key])
    warn("the access token below is shown once; hand it to the agent now, it cannot be shown again")
    console.print(doc["secret"], markup=False, highlight=False, soft_wrap=True)


@connection_app.command("create")
def create(
    member: Annotated[str, typer.Option(help="Email or id of the member this connection is for.")],
    host: Annotated[str, typer.Option(help="Host name or id: the agent that will call.")],
    gateway: Annotated[str, typer.Option(help="Gateway slug or id.")],
    identity: Annotated[
        list[str] | None,
        typer.Option("--identity", metavar="ALIAS=ID", help="Which identity serves a per-user server (repeat)."),
    ] = None,
    token_expires: Expires = None,
    json_out: JsonFlag = False,
) -> None:
    """Provision a connection and mint its access token (printed once)."""
    choices = guarded(lambda: key_values(identity or [], option="--identity"))
    expires_at = guarded(lambda: parse_instant(token_expires, option="--token-expires"))

    async def body(ctx: CliContext) -> dict[str, Any]:
        connection, token, secret = await connections.create(
            ctx.store,
            ctx.hasher,
            ctx.actor,
            host=host,
            gateway=gateway,
            member=member,
            identity_choices=choices,
            token_expires_at=expires_at,
        )
        return {"connection": record(connection, await Names.load(ctx)), "token": token_record(token), "secret": secret}

    doc = run_with(body)
    message = (
        f"connected {doc['connection']['member']} to {doc['connection']['gateway']} via {doc['connection']['host']}"
    )
    emit_token_once(doc, json_out, message=message, record_key="connection")


@connection_app.command("list")
def list_(
    member: Annotated[str | None, typer.Option(help="Only this member's connections (email or id).")] = None,
    host: Annotated[str | None, typer.Option(help="Only connections through this host (name or id).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Everyone's connections (the default).")] = False,
    json_out: JsonFlag = False,
) -> None:
    """List connections."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        if all_ and member is not None:
            raise ValidationFailed("give --member or --all, not both", field="member")
        found = await all_pages(
            lambda c, n: connections.list_page(
                ctx.store, ctx.actor, member=member, host=host, every=member is None, cursor=c, limit=n
            )
        )
        names = await Names.load(ctx)
        return [record(x, names) for x in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Connections")


@connection_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one connection."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await connections.get(ctx.store, ctx.actor, ref), await Names.load(ctx))

    emit_one(run_with(body), json_out)


def _toggle(ref: str, enabled: bool, json_out: bool) -> None:
    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await connections.set_enabled(ctx.store, ctx.actor, ref, enabled), await Names.load(ctx))

    doc = run_with(body)
    state = "enabled" if enabled else "disabled"
    emit_one(doc, json_out, message=f"connection {doc['id']} {state}; its tokens were kept")


@connection_app.command("disable")
def disable(ref: Ref, json_out: JsonFlag = False) -> None:
    """Block the connection's tokens. Nothing is deleted."""
    _toggle(ref, False, json_out)


@connection_app.command("enable")
def enable(ref: Ref, json_out: JsonFlag = False) -> None:
    """Let the connection's tokens work again."""
    _toggle(ref, True, json_out)


@connection_app.command("set-identity")
def set_identity(
    ref: Ref,
    alias: Annotated[str, typer.Argument(help="The gateway's per-user server alias.")],
    identity_id: Annotated[str, typer.Argument(help="One of the member's own identities for that server.")],
    json_out: JsonFlag = False,
) -> None:
    """Serve one per-user server of the connection with another of the member's identities."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        connection = await connections.set_identity(ctx.store, ctx.actor, ref, alias, identity_id)
        return record(connection, await Names.load(ctx))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"connection {doc['id']}: {alias} now uses identity {identity_id}")


@connection_app.command("mint-token")
def mint_token(ref: Ref, token_expires: Expires = None, json_out: JsonFlag = False) -> None:
    """Mint another access token for the connection (to rotate: mint, switch the agent, revoke the old one)."""
    expires_at = guarded(lambda: parse_instant(token_expires, option="--token-expires"))

    async def body(ctx: CliContext) -> dict[str, Any]:
        token, secret = await connections.mint_token(ctx.store, ctx.hasher, ctx.actor, ref, expires_at)
        return {"token": token_record(token), "secret": secret}

    doc = run_with(body)
    emit_token_once(doc, json_out, message=f"minted token {doc['token']['id']}", record_key="token")


@connection_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Delete a connection and its tokens. To stop it for now and keep everything, use `connection disable`."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        connection = await connections.get(ctx.store, ctx.actor, ref)
        await connections.delete(ctx.store, ctx.actor, connection.id)
        return {"deleted": True, "id": connection.id}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted connection {doc['id']}")
