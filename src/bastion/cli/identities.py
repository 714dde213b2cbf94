"""`bastion identity …`: credentials for one server, sealed in the vault. Secrets come from files or stdin only."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, guarded, run_with
from bastion.cli.names import Names
from bastion.cli.options import STDIN, JsonFlag, key_values, read_secret
from bastion.cli.output import emit_json, emit_many, emit_one, success
from bastion.domain.identities import Identity, IdentitySecret, IdentityStatus, bearer_secret
from bastion.errors import ValidationFailed
from bastion.services import identities
from bastion.web.api.schemas_identity import IdentityOut

identity_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("id", "owner", "server", "label", "kind", "status", "fingerprint", "last4", "key_id", "updated_at")
Ref = Annotated[str, typer.Argument(help="The identity's id (see `identity list`).")]
TokenFile = Annotated[
    str | None,
    typer.Option("--bearer-token-file", metavar="FILE", help="Read the bearer token from FILE ('-' is stdin)."),
]
TokenStdin = Annotated[bool, typer.Option("--bearer-token-stdin", help="Read the bearer token from stdin.")]
Headers = Annotated[
    list[str] | None,
    typer.Option("--header", metavar="K=V", help="A header to send; K=@FILE reads the value from FILE (repeat)."),
]


class SettableStatus(StrEnum):
    """What an operator may set; needs_reauth is Bastion's to set when a refresh fails."""

    ACTIVE = "active"
    DISABLED = "disabled"


def record(identity: Identity, names: Names) -> dict[str, Any]:
    """The API's identity document plus the owner's email and the server's name; never the secret."""
    return {
        **IdentityOut.of(identity).model_dump(mode="json"),
        "owner": names.member(identity.owner_id) or "(global)",
        "server": names.server(identity.server_id),
    }


def secret_from(token_file: str | None, token_stdin: bool, headers: list[str] | None) -> IdentitySecret | None:
    """The credential named by the options, read from files or stdin; None when no option gives one."""
    given = [
        name
        for name, on in (
            ("--bearer-token-file", token_file is not None),
            ("--bearer-token-stdin", token_stdin),
            ("--header", bool(headers)),
        )
        if on
    ]
    if len(given) > 1:
        raise ValidationFailed(f"give only one of {', '.join(given)}", field="token")
    if not given:
        return None
    pairs = key_values(headers or [], option="--header")
    stdin_reads = (token_file == STDIN) + token_stdin + sum(v == "@" + STDIN for v in pairs.values())
    if stdin_reads > 1:
        raise ValidationFailed("stdin can be read only once", field="token")
    if token_file is not None or token_stdin:
        source = token_file if token_file is not None else STDIN
        option = "--bearer-token-file" if token_file is not None else "--bearer-token-stdin"
        return bearer_secret(token=read_secret(source, option=option))
    values = {k: read_secret(v[1:], option="--header") if v.startswith("@") else v for k, v in pairs.items()}
    return bearer_secret(headers=values)


@identity_app.command("create")
def create(
    server: Annotated[str, typer.Option(help="Server name or id the credential is for.")],
    member: Annotated[str | None, typer.Option(help="Email or id of the member who owns it.")] = None,
    global_: Annotated[bool, typer.Option("--global", help="A workspace-wide identity for shared schemes.")] = False,
    token_file: TokenFile = None,
    token_stdin: TokenStdin = False,
    header: Headers = None,
    label: Annotated[str | None, typer.Option(help="A name for it (default: server and kind).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Seal and store a bearer token or a set of headers for one server."""

    def parse() -> IdentitySecret:
        if global_ and member is not None:
            raise ValidationFailed("a global identity has no owner: give --member or --global", field="member")
        secret = secret_from(token_file, token_stdin, header)
        if secret is None:
            raise ValidationFailed("give --bearer-token-file, --bearer-token-stdin or --header", field="token")
        return secret

    secret = guarded(parse)

    async def body(ctx: CliContext) -> dict[str, Any]:
        identity = await identities.create(
            ctx.store,
            ctx.vault,
            ctx.hasher,
            ctx.actor,
            server=server,
            secret=secret,
            owner=member,
            shared=global_,
            label=label,
        )
        return record(identity, await Names.load(ctx))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"stored identity {doc['label']} for {doc['owner']}")


@identity_app.command("list")
def list_(
    member: Annotated[str | None, typer.Option(help="Only this member's identities (email or id).")] = None,
    global_: Annotated[bool, typer.Option("--global", help="Only global identities.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Everyone's and the global ones (the default).")] = False,
    server: Annotated[str | None, typer.Option(help="Only identities for this server (name or id).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """List identities: fingerprint and last 4 characters, never the secrets."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        if sum((member is not None, global_, all_)) > 1:
            raise ValidationFailed("give only one of --member, --global and --all", field="member")
        every = member is None and not global_
        found = await all_pages(
            lambda c, n: identities.list_page(
                ctx.store,
                ctx.actor,
                member=member,
                server=server,
                shared=global_ or None,
                every=every,
                cursor=c,
                limit=n,
            )
        )
        names = await Names.load(ctx)
        return [record(i, names) for i in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Identities")


@identity_app.command("show")
def show(ref: Ref, json_out: JsonFlag = False) -> None:
    """Show one identity."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return record(await identities.get(ctx.store, ctx.actor, ref), await Names.load(ctx))

    emit_one(run_with(body), json_out)


@identity_app.command("update")
def update(
    ref: Ref,
    label: Annotated[str | None, typer.Option(help="New label.")] = None,
    status: Annotated[SettableStatus | None, typer.Option(help="active, or disabled to stop its use.")] = None,
    token_file: TokenFile = None,
    token_stdin: TokenStdin = False,
    header: Headers = None,
    json_out: JsonFlag = False,
) -> None:
    """Relabel, enable or disable, or replace the credential (re-sealed under a fresh data key)."""
    secret = guarded(lambda: secret_from(token_file, token_stdin, header))

    async def body(ctx: CliContext) -> dict[str, Any]:
        if label is None and status is None and secret is None:
            raise ValidationFailed("nothing to update: give --label, --status or a new credential")
        new_status = IdentityStatus(status.value) if status is not None else None
        identity = await identities.update(
            ctx.store, ctx.vault, ctx.hasher, ctx.actor, ref, label=label, status=new_status, secret=secret
        )
        return record(identity, await Names.load(ctx))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated identity {doc['label']}")


@identity_app.command("delete")
def delete(ref: Ref, json_out: JsonFlag = False) -> None:
    """Delete an identity: its sealed secret and data key go with the row."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        identity = await identities.get(ctx.store, ctx.actor, ref)
        await identities.delete(ctx.store, ctx.actor, identity.id, revoker=ctx.revoker())
        return {"deleted": True, "id": identity.id, "label": identity.label}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted identity {doc['label']}")
