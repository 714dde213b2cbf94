"""Webhook routes: endpoints per host, secret rotation, the delivery log, redeliver and test; host keys; and the
one route a host calls itself, with its own key: redeeming a claim code."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from bastion.domain.capabilities import Capability as C
from bastion.domain.webhooks import MessageStatus
from bastion.services import claims, host_keys, webhooks
from bastion.web.api.deps import (
    Ctx,
    CurrentActor,
    CurrentHost,
    Cursor,
    Limit,
    host_only,
    if_match,
    needs,
    set_etag,
)
from bastion.web.api.schemas import PageOut
from bastion.web.api.schemas_webhooks import (
    ClaimRedeem,
    ClaimRedeemed,
    DeliveryOut,
    EndpointCreate,
    EndpointOut,
    EndpointUpdate,
    EndpointWithSecret,
    HostKeyCreate,
    HostKeyCreated,
    HostKeyOut,
    MessageOut,
    SecretRotate,
)

router = APIRouter()
Ref = Annotated[str, Path(min_length=1, max_length=254, description="Host id or name")]
Id = Annotated[str, Path(min_length=1, max_length=64)]
_READ = webhooks.READ
_KEYS_READ = host_keys.READ
_KEYS_MANAGE = host_keys.MANAGE
_BASE = "/hosts/{ref}/webhooks"
_ONE = _BASE + "/{endpoint_id}"


# --- endpoints ------------------------------------------------------------------------------------------------------


@router.get(_BASE, tags=["webhooks"], openapi_extra=needs(*_READ))
async def list_webhooks(ctx: Ctx, actor: CurrentActor, ref: Ref) -> list[EndpointOut]:
    """The host's webhook endpoints (its own `webhook_url` is the one with `from_host`)."""
    return [EndpointOut.of(e) for e in await webhooks.list_endpoints(ctx.store, actor, ref)]


@router.post(_BASE, tags=["webhooks"], status_code=201, openapi_extra=needs(C.HOSTS_MANAGE))
async def create_webhook(
    ctx: Ctx, actor: CurrentActor, ref: Ref, body: EndpointCreate, request: Request, response: Response
) -> EndpointWithSecret:
    """Add an endpoint. Its signing secret is in this response only."""
    endpoint, secret = await webhooks.create_endpoint(
        ctx.store,
        ctx.vault,
        actor,
        ref,
        url=body.url,
        description=body.description,
        types=body.event_types,
        token_delivery=body.token_delivery,
        enabled=body.enabled,
    )
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{endpoint.id}"
    set_etag(response, endpoint.version)
    return EndpointWithSecret(endpoint=EndpointOut.of(endpoint), secret=secret)


@router.get(_ONE, tags=["webhooks"], openapi_extra=needs(*_READ))
async def get_webhook(ctx: Ctx, actor: CurrentActor, ref: Ref, endpoint_id: Id, response: Response) -> EndpointOut:
    endpoint = await webhooks.get_endpoint(ctx.store, actor, ref, endpoint_id)
    set_etag(response, endpoint.version)
    return EndpointOut.of(endpoint)


@router.patch(_ONE, tags=["webhooks"], openapi_extra=needs(C.HOSTS_MANAGE))
async def update_webhook(
    ctx: Ctx,
    actor: CurrentActor,
    ref: Ref,
    endpoint_id: Id,
    body: EndpointUpdate,
    request: Request,
    response: Response,
) -> EndpointOut:
    """Change only the fields sent. A disabled endpoint keeps its events until it is enabled again."""
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    endpoint = await webhooks.update_endpoint(ctx.store, actor, ref, endpoint_id, changes, if_match(request))
    set_etag(response, endpoint.version)
    return EndpointOut.of(endpoint)


@router.delete(_ONE, tags=["webhooks"], status_code=204, response_class=Response, openapi_extra=needs(C.HOSTS_MANAGE))
async def delete_webhook(ctx: Ctx, actor: CurrentActor, ref: Ref, endpoint_id: Id) -> None:
    await webhooks.delete_endpoint(ctx.store, actor, ref, endpoint_id)


@router.post(_ONE + "/rotate-secret", tags=["webhooks"], openapi_extra=needs(C.HOSTS_MANAGE))
async def rotate_webhook_secret(
    ctx: Ctx, actor: CurrentActor, ref: Ref, endpoint_id: Id, body: SecretRotate
) -> EndpointWithSecret:
    """A new signing secret (in this response only); the previous one also signs for `overlap_hours`."""
    endpoint, secret = await webhooks.rotate_secret(
        ctx.store, ctx.vault, actor, ref, endpoint_id, overlap=timedelta(hours=body.overlap_hours)
    )
    return EndpointWithSecret(endpoint=EndpointOut.of(endpoint), secret=secret)


@router.post(_ONE + "/retire-old-secrets", tags=["webhooks"], openapi_extra=needs(C.HOSTS_MANAGE))
async def retire_webhook_secrets(ctx: Ctx, actor: CurrentActor, ref: Ref, endpoint_id: Id) -> EndpointOut:
    """End a rotation now: only the newest secret signs."""
    return EndpointOut.of(await webhooks.retire_old_secrets(ctx.store, actor, ref, endpoint_id))


@router.post(_ONE + "/test", tags=["webhooks"], openapi_extra=needs(C.HOSTS_MANAGE))
async def test_webhook(ctx: Ctx, actor: CurrentActor, ref: Ref, endpoint_id: Id) -> DeliveryOut:
    """Send a signed `webhook.test` event now and answer with how the attempt went."""
    return DeliveryOut.of(await webhooks.send_test(ctx.store, ctx.sender(), actor, ref, endpoint_id))


# --- the delivery log -----------------------------------------------------------------------------------------------


@router.get(_ONE + "/events", tags=["webhooks"], openapi_extra=needs(*_READ))
async def list_webhook_events(
    ctx: Ctx,
    actor: CurrentActor,
    ref: Ref,
    endpoint_id: Id,
    status: Annotated[MessageStatus | None, Query(description="Only events in this state")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PageOut[MessageOut]:
    """The endpoint's events, oldest first: pending (with the next attempt), delivered or failed."""
    page = await webhooks.list_messages(ctx.store, actor, ref, endpoint_id, status=status, cursor=cursor, limit=limit)
    return PageOut(items=[MessageOut.of(m) for m in page.items], next_cursor=page.next_cursor)


@router.get(_ONE + "/deliveries", tags=["webhooks"], openapi_extra=needs(*_READ))
async def list_webhook_deliveries(
    ctx: Ctx,
    actor: CurrentActor,
    ref: Ref,
    endpoint_id: Id,
    event: Annotated[str | None, Query(max_length=64, description="Only attempts at this event")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PageOut[DeliveryOut]:
    """Every attempt, oldest first: status code or error class, and duration. Never the body."""
    page = await webhooks.list_deliveries(ctx.store, actor, ref, endpoint_id, message=event, cursor=cursor, limit=limit)
    return PageOut(items=[DeliveryOut.of(d) for d in page.items], next_cursor=page.next_cursor)


@router.post(_ONE + "/events/{event_id}/redeliver", tags=["webhooks"], openapi_extra=needs(C.HOSTS_MANAGE))
async def redeliver_webhook_event(
    ctx: Ctx, actor: CurrentActor, ref: Ref, endpoint_id: Id, event_id: Id
) -> DeliveryOut:
    """Attempt one event again now (same `webhook-id`); if that fails it is retried on a fresh schedule."""
    return DeliveryOut.of(await webhooks.redeliver(ctx.store, ctx.sender(), actor, ref, endpoint_id, event_id))


# --- host keys ------------------------------------------------------------------------------------------------------


@router.get("/hosts/{ref}/keys", tags=["hosts"], openapi_extra=needs(*_KEYS_READ))
async def list_host_keys(
    ctx: Ctx, actor: CurrentActor, ref: Ref, cursor: Cursor = None, limit: Limit = None
) -> PageOut[HostKeyOut]:
    page = await host_keys.list_page(ctx.store, actor, ref, cursor=cursor, limit=limit)
    return PageOut(items=[HostKeyOut.of(k) for k in page.items], next_cursor=page.next_cursor)


@router.post("/hosts/{ref}/keys", tags=["hosts"], status_code=201, openapi_extra=needs(*_KEYS_MANAGE))
async def create_host_key(ctx: Ctx, actor: CurrentActor, ref: Ref, body: HostKeyCreate) -> HostKeyCreated:
    """A key the host authenticates with to redeem claim codes. The secret is in this response only."""
    key, secret = await host_keys.create(ctx.store, ctx.hasher, actor, ref, name=body.name, expires_at=body.expires_at)
    return HostKeyCreated(key=HostKeyOut.of(key), secret=secret)


@router.delete(
    "/hosts/{ref}/keys/{key_id}",
    tags=["hosts"],
    status_code=204,
    response_class=Response,
    openapi_extra=needs(*_KEYS_MANAGE),
)
async def revoke_host_key(ctx: Ctx, actor: CurrentActor, ref: Ref, key_id: Id) -> None:
    """Revoke at once; the key stays listed, marked revoked."""
    await host_keys.revoke(ctx.store, actor, ref, key_id)


# --- for hosts ------------------------------------------------------------------------------------------------------


@router.post("/claims/redeem", tags=["claims"], openapi_extra=host_only())
async def redeem_claim(ctx: Ctx, host: CurrentHost, body: ClaimRedeem, response: Response) -> ClaimRedeemed:
    """Exchange a claim code from a webhook event for its access token: once, by the host it was sent to.

    Authenticate with the host's key (`Authorization: Bearer bsh_…`). Any code that is not this host's to redeem
    now (unknown, used, expired, another host's) answers 404 alike.
    """
    claimed = await claims.redeem(ctx.store, ctx.vault, ctx.hasher, host, body.claim_code.get_secret_value())
    response.headers["Cache-Control"] = "no-store"
    return ClaimRedeemed.of(claimed)
