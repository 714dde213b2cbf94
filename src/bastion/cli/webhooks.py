"""`bastion webhook …` and `bastion host-key …`: where a host's events go, how they went, and the host's own key.

Signing secrets and host keys are printed once, on their own line. `webhook test` and `webhook redeliver` attempt
at once from this process (through the outbound policy the settings describe) and print the attempt.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import typer

from bastion.cli.connections import parse_instant
from bastion.cli.context import CliContext, all_pages, guarded, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import EXIT_ERROR, console, emit_json, emit_many, emit_one, emit_record, success, warn
from bastion.domain.webhooks import SUBSCRIBABLE, MessageStatus, TokenDelivery
from bastion.errors import ValidationFailed
from bastion.net.outbound import OutboundPolicy
from bastion.services import host_keys, webhooks
from bastion.services.delivery import Sender
from bastion.web.api.schemas_webhooks import DeliveryOut, EndpointOut, HostKeyOut, MessageOut

webhook_app = typer.Typer(no_args_is_help=True, add_completion=False)
host_key_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("id", "url", "enabled", "token_delivery", "from_host", "event_types", "version")
EVENT_COLUMNS = ("id", "event_type", "version", "status", "attempts", "next_attempt_at", "last_error", "webhook_id")
DELIVERY_COLUMNS = ("attempted_at", "message_id", "attempt", "trigger", "status_code", "error", "duration_ms")
KEY_COLUMNS = ("id", "name", "last4", "created_at", "expires_at", "revoked_at", "last_used_at")
Host = Annotated[str, typer.Argument(help="Host name or id.")]
EndpointId = Annotated[str, typer.Argument(help="The endpoint's id (see `webhook list`).")]
Events = Annotated[
    list[str] | None,
    typer.Option("--event", help="An event type to receive (repeat; default all): " + ", ".join(SUBSCRIBABLE)),
]


def _record(endpoint: Any) -> dict[str, Any]:
    return EndpointOut.of(endpoint).model_dump(mode="json")


def _sender(ctx: CliContext) -> Sender:
    return Sender(ctx.vault, OutboundPolicy.from_settings(ctx.settings), ctx.settings.public_url)


def _with_secret(doc: dict[str, Any], json_out: bool, *, message: str) -> None:
    if json_out:
        emit_json(doc)
        return
    success(message)
    emit_record(doc["endpoint"])
    warn("the signing secret below is shown once; configure the receiver with it now")
    console.print(doc["secret"], markup=False, highlight=False, soft_wrap=True)


@webhook_app.command("create")
def create(
    host: Host,
    url: Annotated[str, typer.Argument(help="https URL the events are POSTed to.")],
    event: Events = None,
    token_delivery: Annotated[
        TokenDelivery, typer.Option(help="claim_code: a one-time code the host redeems; token: the token itself.")
    ] = TokenDelivery.CLAIM_CODE,
    description: Annotated[str, typer.Option(help="What receives these events.")] = "",
    disabled: Annotated[bool, typer.Option("--disabled", help="Create it paused.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Add an endpoint to a host; its signing secret is printed once."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        endpoint, secret = await webhooks.create_endpoint(
            ctx.store,
            ctx.vault,
            ctx.actor,
            host,
            url=url,
            description=description,
            types=event,
            token_delivery=token_delivery,
            enabled=not disabled,
        )
        return {"endpoint": _record(endpoint), "secret": secret}

    doc = run_with(body)
    _with_secret(doc, json_out, message=f"added endpoint {doc['endpoint']['id']} to {host}")


@webhook_app.command("list")
def list_(host: Host, json_out: JsonFlag = False) -> None:
    """The host's endpoints."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        return [_record(e) for e in await webhooks.list_endpoints(ctx.store, ctx.actor, host)]

    emit_many(run_with(body), json_out, COLUMNS, title=f"Webhook endpoints of {host}")


@webhook_app.command("show")
def show(host: Host, endpoint: EndpointId, json_out: JsonFlag = False) -> None:
    """One endpoint, with its live secrets (when each was made and until when it signs; never the value)."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return _record(await webhooks.get_endpoint(ctx.store, ctx.actor, host, endpoint))

    emit_one(run_with(body), json_out)


@webhook_app.command("update")
def update(
    host: Host,
    endpoint: EndpointId,
    url: Annotated[str | None, typer.Option(help="New URL.")] = None,
    event: Events = None,
    token_delivery: Annotated[TokenDelivery | None, typer.Option(help="claim_code or token.")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable", help="Resume or pause deliveries.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Change only the options given. A paused endpoint keeps its events until it is enabled again."""
    given = {"url": url, "event_types": event, "token_delivery": token_delivery, "description": description}
    changes: dict[str, Any] = {k: v for k, v in {**given, "enabled": enabled}.items() if v is not None}

    async def body(ctx: CliContext) -> dict[str, Any]:
        if not changes:
            raise ValidationFailed("nothing to update: give an option to change")
        return _record(await webhooks.update_endpoint(ctx.store, ctx.actor, host, endpoint, changes))

    doc = run_with(body)
    emit_one(doc, json_out, message=f"updated endpoint {doc['id']}")


@webhook_app.command("delete")
def delete(host: Host, endpoint: EndpointId, json_out: JsonFlag = False) -> None:
    """Delete an endpoint, its secrets, its waiting events and its log."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        await webhooks.delete_endpoint(ctx.store, ctx.actor, host, endpoint)
        return {"deleted": True, "id": endpoint}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"deleted endpoint {endpoint}")


@webhook_app.command("rotate")
def rotate(
    host: Host,
    endpoint: EndpointId,
    overlap_hours: Annotated[
        float, typer.Option(min=0, max=168, help="How long the previous secret keeps signing too.")
    ] = 24,
    json_out: JsonFlag = False,
) -> None:
    """A new signing secret, printed once; both sign until the overlap ends or `retire-old`."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        found, secret = await webhooks.rotate_secret(
            ctx.store, ctx.vault, ctx.actor, host, endpoint, overlap=timedelta(hours=overlap_hours)
        )
        return {"endpoint": _record(found), "secret": secret}

    doc = run_with(body)
    _with_secret(doc, json_out, message=f"rotated the signing secret of endpoint {endpoint}")


@webhook_app.command("retire-old")
def retire_old(host: Host, endpoint: EndpointId, json_out: JsonFlag = False) -> None:
    """End a rotation now: only the newest secret signs."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return _record(await webhooks.retire_old_secrets(ctx.store, ctx.actor, host, endpoint))

    emit_one(run_with(body), json_out, message=f"endpoint {endpoint} now signs with its newest secret only")


def _attempted(doc: dict[str, Any], json_out: bool, what: str) -> None:
    """How the attempt went; exit 1 when it was not delivered, so a script (or CI) can tell."""
    delivered = doc["outcome"] == "delivered"
    if json_out:
        emit_json(doc)
    else:
        if delivered:
            success(f"{what} delivered ({doc['status_code']}, {doc['duration_ms']} ms)")
        else:
            warn(f"{what} failed: {doc['error'] or 'HTTP ' + str(doc['status_code'])}")
        emit_record(doc)
    if not delivered:
        raise typer.Exit(EXIT_ERROR)


@webhook_app.command("test")
def test(host: Host, endpoint: EndpointId, json_out: JsonFlag = False) -> None:
    """Send a signed `webhook.test` event now and print how it went."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        found = await webhooks.send_test(ctx.store, _sender(ctx), ctx.actor, host, endpoint)
        return DeliveryOut.of(found).model_dump(mode="json")

    _attempted(run_with(body), json_out, "test event")


@webhook_app.command("events")
def events(
    host: Host,
    endpoint: EndpointId,
    status: Annotated[MessageStatus | None, typer.Option(help="Only events in this state.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """The endpoint's events, oldest first: pending (with the next attempt), delivered or failed."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(
            lambda c, n: webhooks.list_messages(ctx.store, ctx.actor, host, endpoint, status=status, cursor=c, limit=n)
        )
        return [MessageOut.of(m).model_dump(mode="json") for m in found]

    emit_many(run_with(body), json_out, EVENT_COLUMNS, title=f"Events for endpoint {endpoint}")


@webhook_app.command("deliveries")
def deliveries(
    host: Host,
    endpoint: EndpointId,
    event: Annotated[str | None, typer.Option(help="Only attempts at this event (its id).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Every attempt, oldest first: status code or error class, and duration."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(
            lambda c, n: webhooks.list_deliveries(
                ctx.store, ctx.actor, host, endpoint, message=event, cursor=c, limit=n
            )
        )
        return [DeliveryOut.of(d).model_dump(mode="json") for d in found]

    emit_many(run_with(body), json_out, DELIVERY_COLUMNS, title=f"Delivery log of endpoint {endpoint}")


@webhook_app.command("redeliver")
def redeliver(
    host: Host,
    endpoint: EndpointId,
    event: Annotated[str, typer.Argument(help="The event's id (see `webhook events`).")],
    json_out: JsonFlag = False,
) -> None:
    """Attempt one event again now (same webhook-id); if that fails it is retried on a fresh schedule."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        found = await webhooks.redeliver(ctx.store, _sender(ctx), ctx.actor, host, endpoint, event)
        return DeliveryOut.of(found).model_dump(mode="json")

    _attempted(run_with(body), json_out, f"event {event}")


# --- host keys ------------------------------------------------------------------------------------------------------


@host_key_app.command("create")
def create_key(
    host: Host,
    name: Annotated[str, typer.Option(help="What holds this key, e.g. the agent's deployment.")] = "agent",
    expires: Annotated[str | None, typer.Option(help="ISO 8601 expiry (default: none).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """A key for the host to redeem claim codes with; printed once."""
    expires_at = guarded(lambda: parse_instant(expires, option="--expires"))

    async def body(ctx: CliContext) -> dict[str, Any]:
        key, secret = await host_keys.create(ctx.store, ctx.hasher, ctx.actor, host, name=name, expires_at=expires_at)
        return {"key": HostKeyOut.of(key).model_dump(mode="json"), "secret": secret}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
        return
    success(f"created host key {doc['key']['id']} for {host}")
    emit_record(doc["key"])
    warn("the host key below is shown once; give it to the agent now")
    console.print(doc["secret"], markup=False, highlight=False, soft_wrap=True)


@host_key_app.command("list")
def list_keys(host: Host, json_out: JsonFlag = False) -> None:
    """The host's keys, revoked ones included; only their last 4 characters."""

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found = await all_pages(lambda c, n: host_keys.list_page(ctx.store, ctx.actor, host, cursor=c, limit=n))
        return [HostKeyOut.of(k).model_dump(mode="json") for k in found]

    emit_many(run_with(body), json_out, KEY_COLUMNS, title=f"Host keys of {host}")


@host_key_app.command("revoke")
def revoke_key(
    host: Host,
    key_id: Annotated[str, typer.Argument(help="The key's id (see `host-key list`).")],
    json_out: JsonFlag = False,
) -> None:
    """Revoke a host key at once."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return HostKeyOut.of(await host_keys.revoke(ctx.store, ctx.actor, host, key_id)).model_dump(mode="json")

    emit_one(run_with(body), json_out, message=f"revoked host key {key_id}")
