"""Admin routes. Each declares who may call it (``x-bastion-access``); services enforce it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from bastion.domain.capabilities import Capability as C
from bastion.domain.models import MemberStatus, Transport
from bastion.domain.specs import HostSpec, MemberSpec, RoleSpec, ServerSpec
from bastion.services import apikeys, gateways, hosts, members, roles, servers
from bastion.web.api.deps import Ctx, CurrentActor, Cursor, Limit, if_match, needs, self_service, set_etag
from bastion.web.api.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    CapabilityOut,
    GatewayCreate,
    GatewayOut,
    GatewayUpdate,
    HostCreate,
    HostOut,
    HostUpdate,
    MemberCreate,
    MemberOut,
    MemberUpdate,
    MeOut,
    PageOut,
    RoleCreate,
    RoleOut,
    RoleUpdate,
    ServerCreate,
    ServerOut,
    ServerUpdate,
    capabilities_out,
    server_fields,
)

router = APIRouter()
Ref = Annotated[str, Path(min_length=1, max_length=254, description="id or name")]
KeyId = Annotated[str, Path(min_length=1, max_length=64)]
_ROLE_READ = (C.ROLES_MANAGE, C.MEMBERS_MANAGE, C.ADMIN_VIEW)
_SERVER_READ = (C.SERVERS_MANAGE, C.GATEWAYS_MANAGE, C.ADMIN_VIEW)
_GATEWAY_READ = (C.GATEWAYS_MANAGE, C.HOSTS_MANAGE, C.TOKENS_MANAGE, C.ADMIN_VIEW)
_HOST_READ = (C.HOSTS_MANAGE, C.HOSTS_DISABLE_ENABLE, C.TOKENS_MANAGE, C.ADMIN_VIEW)


def _created(response: Response, request: Request, object_id: str, version: int) -> None:
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{object_id}"
    set_etag(response, version)


# --- self -----------------------------------------------------------------------------------------------------------


@router.get("/capabilities", tags=["roles"], openapi_extra=self_service())
async def list_capabilities(actor: CurrentActor) -> list[CapabilityOut]:
    """The capability catalogue with human labels."""
    return capabilities_out()


@router.get("/me", tags=["self"], openapi_extra=self_service())
async def get_me(ctx: Ctx, actor: CurrentActor) -> MeOut:
    member, role = await members.get_self(ctx.store, actor)
    return MeOut(member=MemberOut.from_domain(member), role=RoleOut.of(role))


@router.get("/me/api-keys", tags=["self"], openapi_extra=self_service())
async def list_my_api_keys(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None
) -> PageOut[ApiKeyOut]:
    page = await apikeys.list_page(ctx.store, actor, cursor=cursor, limit=limit)
    return PageOut(items=[ApiKeyOut.from_domain(k) for k in page.items], next_cursor=page.next_cursor)


@router.post("/me/api-keys", tags=["self"], status_code=201, openapi_extra=self_service())
async def create_my_api_key(ctx: Ctx, actor: CurrentActor, body: ApiKeyCreate) -> ApiKeyCreated:
    """Mint an API key for yourself. The secret is in this response only."""
    key, secret = await apikeys.create(ctx.store, ctx.hasher, actor, name=body.name, expires_at=body.expires_at)
    return ApiKeyCreated(key=ApiKeyOut.from_domain(key), secret=secret)


@router.delete(
    "/me/api-keys/{key_id}", tags=["self"], openapi_extra=self_service(), status_code=204, response_class=Response
)
async def revoke_my_api_key(ctx: Ctx, actor: CurrentActor, key_id: KeyId) -> None:
    await apikeys.revoke(ctx.store, actor, key_id)


# --- roles ----------------------------------------------------------------------------------------------------------


@router.get("/roles", tags=["roles"], openapi_extra=needs(*_ROLE_READ))
async def list_roles(ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None) -> PageOut[RoleOut]:
    page = await roles.list_page(ctx.store, actor, cursor=cursor, limit=limit)
    return PageOut(items=[RoleOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/roles", tags=["roles"], status_code=201, openapi_extra=needs(C.ROLES_MANAGE))
async def create_role(ctx: Ctx, actor: CurrentActor, body: RoleCreate, request: Request, response: Response) -> RoleOut:
    role = await roles.create(ctx.store, actor, RoleSpec(body.name, body.description, frozenset(body.capabilities)))
    _created(response, request, role.id, role.version)
    return RoleOut.of(role)


@router.get("/roles/{ref}", tags=["roles"], openapi_extra=needs(*_ROLE_READ))
async def get_role(ctx: Ctx, actor: CurrentActor, ref: Ref, response: Response) -> RoleOut:
    role = await roles.get(ctx.store, actor, ref)
    set_etag(response, role.version)
    return RoleOut.of(role)


@router.patch("/roles/{ref}", tags=["roles"], openapi_extra=needs(C.ROLES_MANAGE))
async def update_role(
    ctx: Ctx, actor: CurrentActor, ref: Ref, body: RoleUpdate, request: Request, response: Response
) -> RoleOut:
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "capabilities" in changes:
        changes["capabilities"] = frozenset(body.capabilities or ())
    role = await roles.update(ctx.store, actor, ref, changes, if_match(request))
    set_etag(response, role.version)
    return RoleOut.of(role)


@router.delete(
    "/roles/{ref}", tags=["roles"], openapi_extra=needs(C.ROLES_MANAGE), status_code=204, response_class=Response
)
async def delete_role(ctx: Ctx, actor: CurrentActor, ref: Ref) -> None:
    await roles.delete(ctx.store, actor, ref)


# --- members --------------------------------------------------------------------------------------------------------


@router.get("/members", tags=["members"], openapi_extra=needs(C.MEMBERS_MANAGE, C.ADMIN_VIEW))
async def list_members(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None, status: MemberStatus | None = None
) -> PageOut[MemberOut]:
    page = await members.list_page(ctx.store, actor, cursor=cursor, limit=limit, status=status)
    return PageOut(items=[MemberOut.from_domain(m) for m in page.items], next_cursor=page.next_cursor)


@router.post("/members", tags=["members"], status_code=201, openapi_extra=needs(C.MEMBERS_MANAGE))
async def create_member(
    ctx: Ctx, actor: CurrentActor, body: MemberCreate, request: Request, response: Response
) -> MemberOut:
    member = await members.create(ctx.store, actor, MemberSpec(body.email, body.name, body.role))
    _created(response, request, member.id, member.version)
    return MemberOut.from_domain(member)


@router.get("/members/{ref}", tags=["members"], openapi_extra=needs(C.MEMBERS_MANAGE, C.ADMIN_VIEW))
async def get_member(ctx: Ctx, actor: CurrentActor, ref: Ref, response: Response) -> MemberOut:
    member = await members.get(ctx.store, actor, ref)
    set_etag(response, member.version)
    return MemberOut.from_domain(member)


@router.patch("/members/{ref}", tags=["members"], openapi_extra=needs(C.MEMBERS_MANAGE))
async def update_member(
    ctx: Ctx, actor: CurrentActor, ref: Ref, body: MemberUpdate, request: Request, response: Response
) -> MemberOut:
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    member = await members.update(ctx.store, actor, ref, changes, if_match(request))
    set_etag(response, member.version)
    return MemberOut.from_domain(member)


@router.delete(
    "/members/{ref}", tags=["members"], openapi_extra=needs(C.MEMBERS_MANAGE), status_code=204, response_class=Response
)
async def delete_member(ctx: Ctx, actor: CurrentActor, ref: Ref) -> None:
    await members.delete(ctx.store, actor, ref, revoker=ctx.revoker)


@router.get("/members/{ref}/api-keys", tags=["members"], openapi_extra=needs(C.MEMBERS_MANAGE))
async def list_member_api_keys(
    ctx: Ctx, actor: CurrentActor, ref: Ref, cursor: Cursor = None, limit: Limit = None
) -> PageOut[ApiKeyOut]:
    actor.require(C.MEMBERS_MANAGE)
    page = await apikeys.list_page(ctx.store, actor, member=ref, cursor=cursor, limit=limit)
    return PageOut(items=[ApiKeyOut.from_domain(k) for k in page.items], next_cursor=page.next_cursor)


@router.delete(
    "/members/{ref}/api-keys/{key_id}",
    tags=["members"],
    openapi_extra=needs(C.MEMBERS_MANAGE),
    status_code=204,
    response_class=Response,
)
async def revoke_member_api_key(ctx: Ctx, actor: CurrentActor, ref: Ref, key_id: KeyId) -> None:
    actor.require(C.MEMBERS_MANAGE)
    await apikeys.revoke(ctx.store, actor, key_id, member=ref)


# --- servers --------------------------------------------------------------------------------------------------------


@router.get("/servers", tags=["servers"], openapi_extra=needs(*_SERVER_READ))
async def list_servers(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None, transport: Transport | None = None
) -> PageOut[ServerOut]:
    page = await servers.list_page(ctx.store, actor, cursor=cursor, limit=limit, transport=transport)
    return PageOut(items=[ServerOut.of(s) for s in page.items], next_cursor=page.next_cursor)


@router.post("/servers", tags=["servers"], status_code=201, openapi_extra=needs(C.SERVERS_MANAGE))
async def create_server(
    ctx: Ctx, actor: CurrentActor, body: ServerCreate, request: Request, response: Response
) -> ServerOut:
    server = await servers.create(ctx.store, actor, ServerSpec(**server_fields(body, partial=False)))
    _created(response, request, server.id, server.version)
    return ServerOut.of(server)


@router.get("/servers/{ref}", tags=["servers"], openapi_extra=needs(*_SERVER_READ))
async def get_server(ctx: Ctx, actor: CurrentActor, ref: Ref, response: Response) -> ServerOut:
    server = await servers.get(ctx.store, actor, ref)
    set_etag(response, server.version)
    return ServerOut.of(server)


@router.patch("/servers/{ref}", tags=["servers"], openapi_extra=needs(C.SERVERS_MANAGE))
async def update_server(
    ctx: Ctx, actor: CurrentActor, ref: Ref, body: ServerUpdate, request: Request, response: Response
) -> ServerOut:
    server = await servers.update(ctx.store, actor, ref, server_fields(body, partial=True), if_match(request))
    set_etag(response, server.version)
    return ServerOut.of(server)


@router.delete(
    "/servers/{ref}", tags=["servers"], openapi_extra=needs(C.SERVERS_MANAGE), status_code=204, response_class=Response
)
async def delete_server(ctx: Ctx, actor: CurrentActor, ref: Ref) -> None:
    await servers.delete(ctx.store, actor, ref)


# --- gateways -------------------------------------------------------------------------------------------------------


@router.get("/gateways", tags=["gateways"], openapi_extra=needs(*_GATEWAY_READ))
async def list_gateways(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None
) -> PageOut[GatewayOut]:
    page = await gateways.list_page(ctx.store, actor, cursor=cursor, limit=limit)
    return PageOut(items=[GatewayOut.of(g, s) for g, s in page.items], next_cursor=page.next_cursor)


@router.post("/gateways", tags=["gateways"], status_code=201, openapi_extra=needs(C.GATEWAYS_MANAGE))
async def create_gateway(
    ctx: Ctx, actor: CurrentActor, body: GatewayCreate, request: Request, response: Response
) -> GatewayOut:
    gateway = await gateways.create(ctx.store, actor, body.to_domain())
    gateway, spec = await gateways.get(ctx.store, actor, gateway.id)
    _created(response, request, gateway.id, gateway.version)
    return GatewayOut.of(gateway, spec)


@router.get("/gateways/{ref}", tags=["gateways"], openapi_extra=needs(*_GATEWAY_READ))
async def get_gateway(ctx: Ctx, actor: CurrentActor, ref: Ref, response: Response) -> GatewayOut:
    gateway, spec = await gateways.get(ctx.store, actor, ref)
    set_etag(response, gateway.version)
    return GatewayOut.of(gateway, spec)


@router.patch("/gateways/{ref}", tags=["gateways"], openapi_extra=needs(C.GATEWAYS_MANAGE))
async def update_gateway(
    ctx: Ctx, actor: CurrentActor, ref: Ref, body: GatewayUpdate, request: Request, response: Response
) -> GatewayOut:
    gateway, spec = await gateways.update(ctx.store, actor, ref, body.changes(), if_match(request))
    set_etag(response, gateway.version)
    return GatewayOut.of(gateway, spec)


@router.delete(
    "/gateways/{ref}",
    tags=["gateways"],
    openapi_extra=needs(C.GATEWAYS_MANAGE),
    status_code=204,
    response_class=Response,
)
async def delete_gateway(ctx: Ctx, actor: CurrentActor, ref: Ref) -> None:
    await gateways.delete(ctx.store, actor, ref)


# --- hosts ----------------------------------------------------------------------------------------------------------


@router.get("/hosts", tags=["hosts"], openapi_extra=needs(*_HOST_READ))
async def list_hosts(
    ctx: Ctx, actor: CurrentActor, cursor: Cursor = None, limit: Limit = None, enabled: bool | None = None
) -> PageOut[HostOut]:
    page = await hosts.list_page(ctx.store, actor, cursor=cursor, limit=limit, enabled=enabled)
    return PageOut(items=[HostOut.from_domain(h) for h in page.items], next_cursor=page.next_cursor)


@router.post("/hosts", tags=["hosts"], status_code=201, openapi_extra=needs(C.HOSTS_MANAGE))
async def create_host(ctx: Ctx, actor: CurrentActor, body: HostCreate, request: Request, response: Response) -> HostOut:
    host = await hosts.create(ctx.store, actor, HostSpec(body.name, body.description, body.webhook_url))
    _created(response, request, host.id, host.version)
    return HostOut.from_domain(host)


@router.get("/hosts/{ref}", tags=["hosts"], openapi_extra=needs(*_HOST_READ))
async def get_host(ctx: Ctx, actor: CurrentActor, ref: Ref, response: Response) -> HostOut:
    host = await hosts.get(ctx.store, actor, ref)
    set_etag(response, host.version)
    return HostOut.from_domain(host)


@router.patch("/hosts/{ref}", tags=["hosts"], openapi_extra=needs(C.HOSTS_MANAGE))
async def update_host(
    ctx: Ctx, actor: CurrentActor, ref: Ref, body: HostUpdate, request: Request, response: Response
) -> HostOut:
    changes = {k: getattr(body, k) for k in body.model_fields_set if k == "webhook_url" or getattr(body, k) is not None}
    host = await hosts.update(ctx.store, actor, ref, changes, if_match(request))
    set_etag(response, host.version)
    return HostOut.from_domain(host)


@router.post("/hosts/{ref}/disable", tags=["hosts"], openapi_extra=needs(C.HOSTS_DISABLE_ENABLE))
async def disable_host(ctx: Ctx, actor: CurrentActor, ref: Ref, request: Request, response: Response) -> HostOut:
    """Block every token of the host at once. Nothing is deleted; enable restores them."""
    host = await hosts.set_enabled(ctx.store, actor, ref, False, if_match(request))
    set_etag(response, host.version)
    return HostOut.from_domain(host)


@router.post("/hosts/{ref}/enable", tags=["hosts"], openapi_extra=needs(C.HOSTS_DISABLE_ENABLE))
async def enable_host(ctx: Ctx, actor: CurrentActor, ref: Ref, request: Request, response: Response) -> HostOut:
    host = await hosts.set_enabled(ctx.store, actor, ref, True, if_match(request))
    set_etag(response, host.version)
    return HostOut.from_domain(host)


@router.delete(
    "/hosts/{ref}", tags=["hosts"], openapi_extra=needs(C.HOSTS_MANAGE), status_code=204, response_class=Response
)
async def delete_host(ctx: Ctx, actor: CurrentActor, ref: Ref) -> None:
    await hosts.delete(ctx.store, actor, ref)
