"""`bastion token …`: the access tokens minted for connections. Only their last 4 characters are ever shown."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.connections import token_record
from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.names import Names
from bastion.cli.options import JsonFlag
from bastion.cli.output import emit_many, emit_one
from bastion.domain.connections import AccessToken, Connection
from bastion.errors import ValidationFailed
from bastion.services import connections, tokens

token_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = (
    "id",
    "connection_id",
    "member",
    "host",
    "gateway",
    "last4",
    "state",
    "created_at",
    "expires_at",
    "last_used_at",
)


async def _owners(ctx: CliContext) -> tuple[dict[str, Connection], Names]:
    found = await all_pages(lambda c, n: connections.list_page(ctx.store, ctx.actor, every=True, cursor=c, limit=n))
    return {x.id: x for x in found}, await Names.load(ctx)


def record(token: AccessToken, owners: dict[str, Connection], names: Names) -> dict[str, Any]:
    """The API's token document plus whose it is and where it works; never the token itself."""
    connection = owners.get(token.connection_id)
    return {
        **token_record(token),
        "member": names.member(connection.member_id) if connection else None,
        "host": names.host(connection.host_id) if connection else None,
        "gateway": names.gateway(connection.gateway_id) if connection else None,
    }


@token_app.command("list")
def list_(
    member: Annotated[str | None, typer.Option(help="Only this member's tokens (email or id).")] = None,
    host: Annotated[str | None, typer.Option(help="Only tokens used through this host (name or id).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Everyone's tokens (the default).")] = False,
    json_out: JsonFlag = False,
) -> None:
    """List tokens: id, connection, last 4, state and dates. Revoked and expired ones stay listed."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        if all_ and (member is not None or host is not None):
            raise ValidationFailed("--all lists everyone's tokens; leave out --member and --host", field="every")
        found = await all_pages(
            lambda c, n: tokens.list_page(ctx.store, ctx.actor, member=member, host=host, every=True, cursor=c, limit=n)
        )
        owners, names = await _owners(ctx)
        return [record(t, owners, names) for t in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Access tokens")


@token_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (see `token list`).")], json_out: JsonFlag = False
) -> None:
    """Revoke a token at once. It stays listed, marked revoked."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        token = await tokens.revoke(ctx.store, ctx.actor, token_id)
        owners, names = await _owners(ctx)
        return record(token, owners, names)

    doc = run_with(body)
    emit_one(doc, json_out, message=f"revoked token {doc['id']} (…{doc['last4']})")
