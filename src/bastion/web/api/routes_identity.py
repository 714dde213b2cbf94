"""Identity-core routes: identities, connections, access tokens, connection links, vault status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from bastion.domain.capabilities import Capability as C
from bastion.domain.identities import bearer_secret
from bastion.services import connections, identities, links, rotation, tokens
from bastion.web.api.deps import Ctx, CurrentActor, Cursor, Limit, if_match, link_base, needs, self_service, set_etag
from bastion.web.api.schemas import PageOut
from bastion.web.api.schemas_identity import (
    AccessTokenOut,
    ConnectionCreate,
    ConnectionCreated,
    ConnectionIdentityUpdate,
    ConnectionOut,
    IdentityCreate,
    IdentityOut,
    IdentityUpdate,
    KeyUsageOut,
    LinkCreate,
    LinkCreated,
    LinkOut,
    TokenCreate,
    TokenCreated,
)

router = APIRouter()
Id = Annotated[str, Path(min_length=1, max_length=64)]
MemberRef = Annotated[str | None, Query(max_length=254, description="Member id or email (needs a capability)")]
HostRef = Annotated[str | None, Query(max_length=63, description="Host name or id (needs tokens.manage)")]
Every = Annotated[bool, Query(description="Everyone's, not only yours (needs a capability)")]


def _link_url(request: Request, secret: str) -> str:
    return f"{link_base(request)}/enroll/{secret}"


# --- identities -----------------------------------------------------------------------------------------------------


@router.get("/identities", tags=["identities"], openapi_extra=self_service())
async def list_identities(
    ctx: Ctx,
    actor: CurrentActor,
    member: MemberRef = None,
    server: str | None = None,
    shared: bool | None = None,
    every: Every = False,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PageOut[IdentityOut]:
    """Your own identities; another member's, global ones (`shared=true`) or `every` one need identities.manage."""
    page = await identities.list_page(
        ctx.store, actor, member=member, server=server, shared=shared, every=every, cursor=cursor, limit=limit
    )
    return PageOut(items=[IdentityOut.of(i) for i in page.items], next_cursor=page.next_cursor)


@router.post("/identities", tags=["identities"], status_code=201, openapi_extra=self_service())
async def create_identity(ctx: Ctx, actor: CurrentActor, body: IdentityCreate, response: Response) -> IdentityOut:
    """Store a bearer credential, sealed. For yourself by default; for others or global needs identities.manage."""
    secret = bearer_secret(
        body.token.get_secret_value() if body.token else None,
        {k: v.get_secret_value() for k, v in body.headers.items()} if body.headers else None,
    )
    identity = await identities.create(
        ctx.store,
        ctx.vault,
        ctx.hasher,
        actor,
        server=body.server,
        secret=secret,
        owner=body.member,
        shared=body.shared,
        label=body.label,
    )
    set_etag(response, identity.version)
    return IdentityOut.of(identity)


@router.get("/identities/{identity_id}", tags=["identities"], openapi_extra=self_service())
async def get_identity(ctx: Ctx, actor: CurrentActor, identity_id: Id, response: Response) -> IdentityOut:
    identity = await identities.get(ctx.store, actor, identity_id)
    set_etag(response, identity.version)
    return IdentityOut.of(identity)


@router.patch("/identities/{identity_id}", tags=["identities"], openapi_extra=self_service())
async def update_identity(
    ctx: Ctx, actor: CurrentActor, identity_id: Id, body: IdentityUpdate, request: Request, response: Response
) -> IdentityOut:
    """Relabel, disable/enable, or replace the credential (re-sealed)."""
    secret = None
    if body.token is not None or body.headers is not None:
        secret = bearer_secret(
            body.token.get_secret_value() if body.token else None,
            {k: v.get_secret_value() for k, v in body.headers.items()} if body.headers else None,
        )
    identity = await identities.update(
        ctx.store,
        ctx.vault,
        ctx.hasher,
        actor,
        identity_id,
        label=body.label,
        status=body.status,
        secret=secret,
        expected_version=if_match(request),
    )
    set_etag(response, identity.version)
    return IdentityOut.of(identity)


@router.delete(
    "/identities/{identity_id}",
    tags=["identities"],
    openapi_extra=self_service(),
    status_code=204,
    response_class=Response,
)
async def delete_identity(ctx: Ctx, actor: CurrentActor, identity_id: Id) -> None:
    await identities.delete(ctx.store, actor, identity_id, revoker=ctx.revoker)


# --- connections and tokens -----------------------------------------------------------------------------------------


@router.get("/connections", tags=["connections"], openapi_extra=self_service())
async def list_connections(
    ctx: Ctx,
    actor: CurrentActor,
    member: MemberRef = None,
    host: HostRef = None,
    every: Every = False,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PageOut[ConnectionOut]:
    page = await connections.list_page(
        ctx.store, actor, member=member, host=host, every=every, cursor=cursor, limit=limit
    )
    return PageOut(items=[ConnectionOut.from_domain(c) for c in page.items], next_cursor=page.next_cursor)


@router.post("/connections", tags=["connections"], status_code=201, openapi_extra=self_service())
async def create_connection(ctx: Ctx, actor: CurrentActor, body: ConnectionCreate) -> ConnectionCreated:
    """Provision a connection and mint its access token (shown once). For someone else: tokens.manage."""
    connection, token, secret = await connections.create(
        ctx.store,
        ctx.hasher,
        actor,
        host=body.host,
        gateway=body.gateway,
        member=body.member,
        identity_choices=body.identities,
        token_expires_at=body.token_expires_at,
    )
    return ConnectionCreated(
        connection=ConnectionOut.from_domain(connection), token=AccessTokenOut.of(token), secret=secret
    )


@router.get("/connections/{connection_id}", tags=["connections"], openapi_extra=self_service())
async def get_connection(ctx: Ctx, actor: CurrentActor, connection_id: Id, response: Response) -> ConnectionOut:
    connection = await connections.get(ctx.store, actor, connection_id)
    set_etag(response, connection.version)
    return ConnectionOut.from_domain(connection)


@router.put("/connections/{connection_id}/identities/{alias}", tags=["connections"], openapi_extra=self_service())
async def set_connection_identity(
    ctx: Ctx,
    actor: CurrentActor,
    connection_id: Id,
    alias: Annotated[str, Path(max_length=63)],
    body: ConnectionIdentityUpdate,
) -> ConnectionOut:
    return ConnectionOut.from_domain(
        await connections.set_identity(ctx.store, actor, connection_id, alias, body.identity_id)
    )


@router.post(
    "/connections/{connection_id}/disable", tags=["connections"], openapi_extra=needs(C.CONNECTIONS_DISABLE_ENABLE)
)
async def disable_connection(
    ctx: Ctx, actor: CurrentActor, connection_id: Id, request: Request, response: Response
) -> ConnectionOut:
    connection = await connections.set_enabled(ctx.store, actor, connection_id, False, if_match(request))
    set_etag(response, connection.version)
    return ConnectionOut.from_domain(connection)


@router.post(
    "/connections/{connection_id}/enable", tags=["connections"], openapi_extra=needs(C.CONNECTIONS_DISABLE_ENABLE)
)
async def enable_connection(
    ctx: Ctx, actor: CurrentActor, connection_id: Id, request: Request, response: Response
) -> ConnectionOut:
    connection = await connections.set_enabled(ctx.store, actor, connection_id, True, if_match(request))
    set_etag(response, connection.version)
    return ConnectionOut.from_domain(connection)


@router.post("/connections/{connection_id}/tokens", tags=["connections"], status_code=201, openapi_extra=self_service())
async def mint_connection_token(ctx: Ctx, actor: CurrentActor, connection_id: Id, body: TokenCreate) -> TokenCreated:
    """Another token for the connection, e.g. to rotate without downtime."""
    token, secret = await connections.mint_token(ctx.store, ctx.hasher, actor, connection_id, body.expires_at)
    return TokenCreated(token=AccessTokenOut.of(token), secret=secret)


@router.delete(
    "/connections/{connection_id}",
    tags=["connections"],
    openapi_extra=self_service(),
    status_code=204,
    response_class=Response,
)
async def delete_connection(ctx: Ctx, actor: CurrentActor, connection_id: Id) -> None:
    await connections.delete(ctx.store, actor, connection_id)


@router.get("/tokens", tags=["tokens"], openapi_extra=self_service())
async def list_tokens(
    ctx: Ctx,
    actor: CurrentActor,
    member: MemberRef = None,
    host: HostRef = None,
    every: Every = False,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PageOut[AccessTokenOut]:
    """Your tokens; anyone's (by member, by host, or every) with tokens.manage. Never the token itself."""
    page = await tokens.list_page(ctx.store, actor, member=member, host=host, every=every, cursor=cursor, limit=limit)
    return PageOut(items=[AccessTokenOut.of(t) for t in page.items], next_cursor=page.next_cursor)


@router.post("/tokens/{token_id}/revoke", tags=["tokens"], openapi_extra=self_service())
async def revoke_token(ctx: Ctx, actor: CurrentActor, token_id: Id) -> AccessTokenOut:
    """Revoke your own token, or anyone's with tokens.manage. Effective on the next request."""
    return AccessTokenOut.of(await tokens.revoke(ctx.store, actor, token_id))


# --- connection links -----------------------------------------------------------------------------------------------


@router.get("/links", tags=["links"], openapi_extra=needs(C.TOKENS_MANAGE))
async def list_links(
    ctx: Ctx,
    actor: CurrentActor,
    host: HostRef = None,
    gateway: str | None = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PageOut[LinkOut]:
    page = await links.list_page(ctx.store, actor, host=host, gateway=gateway, cursor=cursor, limit=limit)
    now = datetime.now(UTC)
    return PageOut(items=[LinkOut.of(link, now) for link in page.items], next_cursor=page.next_cursor)


@router.post("/links", tags=["links"], status_code=201, openapi_extra=needs(C.TOKENS_MANAGE))
async def create_link(ctx: Ctx, actor: CurrentActor, body: LinkCreate, request: Request) -> LinkCreated:
    """A shareable enrollment link; its URL is in this response only."""
    link, secret = await links.create(
        ctx.store,
        ctx.hasher,
        actor,
        host=body.host,
        gateway=body.gateway,
        expires_in=timedelta(hours=body.expires_in_hours),
        max_uses=body.max_uses,
        allowed_emails=body.allowed_emails,
        note=body.note,
    )
    return LinkCreated(link=LinkOut.of(link, link.created_at), url=_link_url(request, secret))


@router.post("/links/{link_id}/revoke", tags=["links"], openapi_extra=needs(C.TOKENS_MANAGE))
async def revoke_link(ctx: Ctx, actor: CurrentActor, link_id: Id) -> LinkOut:
    link = await links.revoke(ctx.store, actor, link_id)
    return LinkOut.of(link, datetime.now(UTC))


# --- vault ----------------------------------------------------------------------------------------------------------


@router.get("/vault/keys", tags=["vault"], openapi_extra=needs(C.IDENTITIES_MANAGE))
async def vault_keys(ctx: Ctx, actor: CurrentActor) -> list[KeyUsageOut]:
    """Rows and seals per key-encryption key (ids only; never key material)."""
    actor.require(C.IDENTITIES_MANAGE)
    return [KeyUsageOut.of(u) for u in await rotation.usage(ctx.store, ctx.vault)]
