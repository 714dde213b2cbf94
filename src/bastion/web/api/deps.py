"""Shared route plumbing: the app context, authentication, access declarations, ETags."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bastion.db.store import Store
from bastion.domain import ids
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.webhooks import HostCaller
from bastion.errors import Unauthenticated, Unavailable, ValidationFailed
from bastion.oauth.revocation import Revoker
from bastion.services import apikeys, audit_query, host_keys
from bastion.services.apikeys import KeyHasher
from bastion.services.audit import Audit
from bastion.services.delivery import Sender
from bastion.vault.sealer import Vault

ACCESS_KEY: Final = "x-bastion-access"
SELF: Final = "self"
HOST: Final = "host"  # routes a host calls with its own key (`bsh_…`), never a member
_IF_MATCH: Final = re.compile(r'^(?:W/)?"(\d{1,9})"$')


@dataclass(frozen=True, slots=True)
class ApiContext:
    store: Store
    hasher: KeyHasher
    vault: Vault
    revoker: Revoker | None = None  # RFC 7009 revocation when identities and members are deleted
    webhooks: Sender | None = None  # webhook test events and redeliveries, attempted while the caller waits
    audit: Audit | None = None  # this process's audit writer: reads seal what it has decided first
    public_url: str | None = None  # BASTION_PUBLIC_URL: the base of links handed out (else the request's own)

    async def settled(self) -> Store:
        """The store, once this process's decided audit events are sealed: a reader sees the calls it just made."""
        if self.audit is not None:
            await self.audit.settle()
        return self.store

    def sender(self) -> Sender:
        if self.webhooks is None:
            raise Unavailable("webhook delivery is not set up in this process")
        return self.webhooks


# The admin API is one FastAPI app per process, built once (web/app.py); each Bastion app mounting it puts its
# own context in the request's scope under this key.
CONTEXT_KEY: Final = "bastion.api"


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.scope[CONTEXT_KEY]
    return ctx


def plain_parameters(request: Request) -> None:
    """Query and path parameters hold no NUL, which no database stores (bodies: schemas.Body); the document says
    so too (openapi.document)."""
    for name, value in (*request.query_params.multi_items(), *request.path_params.items()):
        if "\x00" in str(value):
            raise ValidationFailed(f"{name} must not contain NUL characters", field=name)


def link_base(request: Request) -> str:
    """Where links this request hands out start: BASTION_PUBLIC_URL, else the address it was sent to."""
    return (context(request).public_url or str(request.base_url).removesuffix("/api/v1/")).rstrip("/")


_bearer = HTTPBearer(auto_error=False, description="A member API key (`bsk_…`)")


async def authenticated(
    ctx: Annotated[ApiContext, Depends(context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Actor:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("send a member API key as `Authorization: Bearer bsk_…`")
    return await apikeys.authenticate(ctx.store, ctx.hasher, credentials.credentials)


_host_bearer = HTTPBearer(auto_error=False, scheme_name="HostKey", description="A host key (`bsh_…`)")


async def authenticated_host(
    ctx: Annotated[ApiContext, Depends(context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_host_bearer)],
) -> HostCaller:
    """The host presenting its own key. A member's API key is not one: members never act as a host."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("send a host key as `Authorization: Bearer bsh_…`")
    return await host_keys.authenticate(ctx.store, ctx.hasher, credentials.credentials)


Ctx = Annotated[ApiContext, Depends(context)]
CurrentActor = Annotated[Actor, Depends(authenticated)]
CurrentHost = Annotated[HostCaller, Depends(authenticated_host)]


def _cursor(pattern: str) -> Any:
    return Query(
        max_length=200, description="From the previous page's next_cursor", json_schema_extra={"pattern": pattern}
    )


Cursor = Annotated[str | None, _cursor(ids.ID_PATTERN)]
AuditCursor = Annotated[str | None, _cursor(audit_query.AUDIT_CURSOR_PATTERN)]
Limit = Annotated[int | None, Query(ge=1, le=200, description="Page size (default 50)")]


def needs(*capabilities: Capability) -> dict[str, Any]:
    """OpenAPI extension naming the capabilities that admit a caller (any of them); the matrix test reads it."""
    return {ACCESS_KEY: sorted(c.value for c in capabilities)}


def self_service() -> dict[str, Any]:
    """A route any signed-in member may call, acting on their own things."""
    return {ACCESS_KEY: SELF}


def host_only() -> dict[str, Any]:
    """A route for hosts, authenticated by a host key; every member API key is refused (401)."""
    return {ACCESS_KEY: HOST}


def if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    found = _IF_MATCH.fullmatch(raw.strip())
    if not found:
        raise ValidationFailed('If-Match must be an ETag this API returned, like "3"', field="If-Match")
    return int(found.group(1))


def set_etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'
