"""`bastion link …`: shareable enrollment URLs for a host + gateway. The URL is printed once."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import typer

from bastion.cli.context import CliContext, all_pages, guarded, run_with
from bastion.cli.names import Names
from bastion.cli.options import JsonFlag
from bastion.cli.output import console, emit_json, emit_many, emit_one, emit_record, success, warn
from bastion.domain.connections import ConnectionLink
from bastion.errors import ValidationFailed
from bastion.services import links
from bastion.settings import Settings
from bastion.web.api.schemas_identity import LinkOut

link_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("id", "host", "gateway", "state", "uses", "max_uses", "expires_at", "allowed_emails", "note")
_DURATION: Final = re.compile(r"^\s*(\d+)\s*([dhm])\s*$")
_UNITS: Final = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}


def parse_duration(value: str) -> timedelta:
    """``7d``, ``12h`` or ``30m``."""
    match = _DURATION.match(value.lower())
    if match is None:
        raise ValidationFailed(
            f"--expires-in takes a number and d, h or m (e.g. 7d, 12h, 30m), got {value!r}", field="expires_in"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def enrollment_url(settings: Settings, secret: str) -> str:
    """BASTION_PUBLIC_URL, or the address the server listens on, followed by the enrollment path."""
    return f"{settings.base_url}/enroll/{secret}"


def _uses(max_uses: int | None, *, unlimited: bool) -> int | None:
    """The link's use limit: ``--max-uses``, else none (``--unlimited-uses`` says so explicitly)."""
    if unlimited and max_uses is not None:
        raise ValidationFailed("give --max-uses or --unlimited-uses, not both", field="max_uses")
    if unlimited:
        return None
    return links.DEFAULT_MAX_USES if max_uses is None else max_uses


def record(link: ConnectionLink, names: Names, now: datetime) -> dict[str, Any]:
    """The API's link document plus the host's name and the gateway's slug; never the URL."""
    return {
        **LinkOut.of(link, now).model_dump(mode="json"),
        "host": names.host(link.host_id),
        "gateway": names.gateway(link.gateway_id),
    }


@link_app.command("create")
def create(
    host: Annotated[str, typer.Option(help="Host name or id: the agent the enrolled people connect to.")],
    gateway: Annotated[str, typer.Option(help="Gateway slug or id.")],
    expires_in: Annotated[str, typer.Option(help="Lifetime: 72h, 7d, 30m (5 minutes to 90 days).")] = "72h",
    max_uses: Annotated[
        int | None, typer.Option(help="At most this many people may enroll (default: no limit).")
    ] = None,
    unlimited_uses: Annotated[
        bool, typer.Option("--unlimited-uses", help="Any number of people may enroll until it expires (the default).")
    ] = False,
    allow: Annotated[
        list[str] | None, typer.Option("--allow", metavar="EMAIL", help="Only these people may enroll (repeat).")
    ] = None,
    note: Annotated[str, typer.Option(help="What the link is for.")] = "",
    json_out: JsonFlag = False,
) -> None:
    """Create an enrollment link to share: anyone signing in through it within 72 hours enrolls as themselves
    (limit with --max-uses, --allow, --expires-in). Its URL is printed once."""
    lifetime = guarded(lambda: parse_duration(expires_in))
    uses = guarded(lambda: _uses(max_uses, unlimited=unlimited_uses))

    async def body(ctx: CliContext) -> dict[str, Any]:
        link, secret = await links.create(
            ctx.store,
            ctx.hasher,
            ctx.actor,
            host=host,
            gateway=gateway,
            expires_in=lifetime,
            max_uses=uses,
            allowed_emails=allow or (),
            note=note,
        )
        names = await Names.load(ctx)
        return {"link": record(link, names, link.created_at), "url": enrollment_url(ctx.settings, secret)}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
        return
    success(f"created a link to {doc['link']['gateway']} via {doc['link']['host']}")
    emit_record(doc["link"])
    warn("the URL below is shown once; share it now, it cannot be shown again")
    console.print(doc["url"], markup=False, highlight=False, soft_wrap=True)


@link_app.command("list")
def list_(
    host: Annotated[str | None, typer.Option(help="Only links for this host (name or id).")] = None,
    gateway: Annotated[str | None, typer.Option(help="Only links for this gateway (slug or id).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """List links with their uses and state (active, expired, used_up, revoked); never their URLs."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(
            lambda c, n: links.list_page(ctx.store, ctx.actor, host=host, gateway=gateway, cursor=c, limit=n)
        )
        names, now = await Names.load(ctx), datetime.now(UTC)
        return [record(link, names, now) for link in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Connection links")


@link_app.command("revoke")
def revoke(
    link_id: Annotated[str, typer.Argument(help="The link's id (see `link list`).")], json_out: JsonFlag = False
) -> None:
    """Revoke a link at once; people already enrolled keep their connections."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        link = await links.revoke(ctx.store, ctx.actor, link_id)
        return record(link, await Names.load(ctx), datetime.now(UTC))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"revoked link {doc['id']}")
