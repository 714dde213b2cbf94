"""Rows to domain objects and domain values to column values."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from bastion.domain.capabilities import Capability
from bastion.domain.models import (
    ApiKey,
    AuthKind,
    Gateway,
    GatewayServer,
    Host,
    HostKind,
    IdentityScheme,
    Member,
    MemberStatus,
    OAuthClientSettings,
    OAuthRegistration,
    ProtocolEra,
    Provisioning,
    ProvisionMode,
    Role,
    Server,
    Transport,
    Workspace,
)
from bastion.types import ApiKeyId, GatewayId, HostId, MemberId, RoleId, ServerId, WorkspaceId

Row = sa.Row[Any]


def workspace(row: Row) -> Workspace:
    return Workspace(id=WorkspaceId(row.id), name=row.name, created_at=row.created_at)


def role(row: Row) -> Role:
    return Role(
        id=RoleId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        name=row.name,
        description=row.description,
        capabilities=frozenset(Capability(c) for c in row.capabilities if c in Capability.__members__.values()),
        builtin=row.builtin,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def member(row: Row) -> Member:
    return Member(
        id=MemberId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        email=row.email,
        name=row.name,
        status=MemberStatus(row.status),
        role_id=RoleId(row.role_id),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def api_key(row: Row) -> ApiKey:
    return ApiKey(
        id=ApiKeyId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        member_id=MemberId(row.member_id),
        name=row.name,
        last4=row.last4,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def oauth_to_json(value: OAuthClientSettings | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {
        "registration": value.registration.value,
        "client_id": value.client_id,
        "scopes": list(value.scopes),
        "authorization_server": value.authorization_server,
    }


def oauth_from_json(value: dict[str, Any] | None) -> OAuthClientSettings | None:
    if value is None:
        return None
    return OAuthClientSettings(
        registration=OAuthRegistration(value["registration"]),
        client_id=value.get("client_id"),
        scopes=tuple(value.get("scopes", ())),
        authorization_server=value.get("authorization_server"),
    )


def server(row: Row) -> Server:
    return Server(
        id=ServerId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        name=row.name,
        description=row.description,
        transport=Transport(row.transport),
        url=row.url,
        command=row.command,
        args=tuple(row.args),
        env=dict(row.env),
        auth_kind=AuthKind(row.auth_kind),
        oauth=oauth_from_json(row.oauth),
        era=ProtocolEra(row.era),
        connect_timeout_s=row.connect_timeout_s,
        call_timeout_s=row.call_timeout_s,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        token_env=row.token_env,
    )


def provisioning_to_json(tools: Provisioning, prompts: Provisioning, resources: Provisioning) -> dict[str, Any]:
    return {
        kind: {"mode": p.mode.value, "selected": sorted(p.selected)}
        for kind, p in (("tools", tools), ("prompts", prompts), ("resources", resources))
    }


def _provisioning(value: dict[str, Any]) -> Provisioning:
    return Provisioning(mode=ProvisionMode(value["mode"]), selected=frozenset(value.get("selected", ())))


def gateway_server(row: Row) -> GatewayServer:
    prov = row.provisioning
    return GatewayServer(
        server_id=ServerId(row.server_id),
        alias=row.alias,
        identity_scheme=IdentityScheme(row.identity_scheme),
        shared_identity_id=row.shared_identity_id,
        tools=_provisioning(prov["tools"]),
        prompts=_provisioning(prov["prompts"]),
        resources=_provisioning(prov["resources"]),
        namespaced=row.namespaced,
    )


def gateway(row: Row, servers: tuple[GatewayServer, ...]) -> Gateway:
    return Gateway(
        id=GatewayId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        slug=row.slug,
        name=row.name,
        description=row.description,
        enabled=row.enabled,
        servers=servers,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def host(row: Row) -> Host:
    return Host(
        id=HostId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        name=row.name,
        description=row.description,
        kind=HostKind(row.kind),
        enabled=row.enabled,
        webhook_url=row.webhook_url,
        disabled_at=row.disabled_at,
        disabled_by=MemberId(row.disabled_by) if row.disabled_by else None,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
