"""`bastion apikey …`: members' keys for the admin API. A key is shown once; afterwards only its last 4."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, all_pages, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import console, emit_json, emit_many, emit_one, emit_record, success
from bastion.domain.models import ApiKey, Member
from bastion.errors import NotFound, ValidationFailed
from bastion.services import apikeys, members
from bastion.web.api.schemas import ApiKeyOut

apikey_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("id", "member", "name", "last4", "created_at", "expires_at", "revoked_at", "last_used_at")
KeyId = Annotated[str, typer.Argument(help="The key's id (see `apikey list`).")]
MemberOpt = Annotated[str | None, typer.Option(help="The owner's email or id (found automatically if left out).")]


def record(key: ApiKey, member: Member) -> dict[str, Any]:
    """The API's key document plus the owner's email; never the key itself."""
    return {**ApiKeyOut.from_domain(key).model_dump(mode="json"), "member": member.email}


async def _keys(ctx: CliContext, member: str | None) -> list[dict[str, Any]]:
    owners = (
        [await members.get(ctx.store, ctx.actor, member)]
        if member
        else await all_pages(lambda c, n: members.list_page(ctx.store, ctx.actor, cursor=c, limit=n))
    )
    out: list[dict[str, Any]] = []
    for owner in owners:
        keys = await all_pages(
            lambda c, n, m=owner.id: apikeys.list_page(ctx.store, ctx.actor, member=m, cursor=c, limit=n)
        )
        out += [record(k, owner) for k in keys]
    return out


async def _find(ctx: CliContext, key_id: str, member: str | None) -> dict[str, Any]:
    for doc in await _keys(ctx, member):
        if doc["id"] == key_id:
            return doc
    raise NotFound("no such API key")


@apikey_app.command("create")
def create(
    member: Annotated[str, typer.Option(help="Email or id of the member the key acts as.")],
    name: Annotated[str, typer.Option(help="What the key is for, e.g. terraform.")],
    expires_in_days: Annotated[int | None, typer.Option(help="Expire after this many days (default: never).")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the key, e.g. KEY=$(bastion apikey create … -q).")
    ] = False,
    json_out: JsonFlag = False,
) -> None:
    """Mint a key for a member. It is printed once; store it now."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        if expires_in_days is not None and expires_in_days < 1:
            raise ValidationFailed("--expires-in-days must be at least 1", field="expires_at")
        expires_at = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        owner = await members.get(ctx.store, ctx.actor, member)
        key, secret = await apikeys.create(
            ctx.store, ctx.hasher, ctx.actor, name=name, member=owner.id, expires_at=expires_at
        )
        return {"key": record(key, owner), "secret": secret}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
        return
    if quiet:
        sys.stdout.write(doc["secret"] + "\n")
        return
    success(f"created API key {doc['key']['name']} for {doc['key']['member']}")
    emit_record(doc["key"])
    console.print(f"\nAPI key (shown once): [bold]{doc['secret']}[/bold]")


@apikey_app.command("list")
def list_(
    member: Annotated[str | None, typer.Option(help="Only this member's keys (email or id).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """List keys: last 4 characters, dates and owner; never the keys themselves."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        return await _keys(ctx, member)

    emit_many(run_with(body), json_out, COLUMNS, title="API keys")


@apikey_app.command("show")
def show(key_id: KeyId, member: MemberOpt = None, json_out: JsonFlag = False) -> None:
    """Show one key."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return await _find(ctx, key_id, member)

    emit_one(run_with(body), json_out)


@apikey_app.command("revoke")
def revoke(key_id: KeyId, member: MemberOpt = None, json_out: JsonFlag = False) -> None:
    """Revoke a key at once. It stays listed, marked revoked."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        found = await _find(ctx, key_id, member)
        owner = await members.get(ctx.store, ctx.actor, found["member_id"])
        return record(await apikeys.revoke(ctx.store, ctx.actor, key_id, member=owner.id), owner)

    doc = run_with(body)
    emit_one(doc, json_out, message=f"revoked API key {doc['name']} of {doc['member']}")
