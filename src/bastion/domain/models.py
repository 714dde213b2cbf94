"""The admin model as frozen dataclasses: workspace, members, roles, servers, gateways, hosts, API keys."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from bastion.domain.capabilities import Capability
from bastion.types import (
    ApiKeyId,
    GatewayId,
    HostId,
    MemberId,
    RoleId,
    ServerId,
    WorkspaceId,
)


class MemberStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class Transport(StrEnum):
    STREAMABLE_HTTP = "streamable_http"
    SSE = "sse"
    STDIO = "stdio"


class AuthKind(StrEnum):
    NONE = "none"
    BEARER = "bearer"
    OAUTH = "oauth"


class OAuthRegistration(StrEnum):
    """How Bastion becomes known to a server's authorization server. ``auto`` (the default) follows the MCP
    specification's order: a configured client id, else Bastion's client ID metadata document where the
    server supports it, else dynamic registration. The others allow only that one way."""

    AUTO = "auto"
    PRE_REGISTERED = "pre_registered"
    CLIENT_METADATA_DOCUMENT = "client_metadata_document"
    DYNAMIC = "dynamic"


class ProtocolEra(StrEnum):
    AUTO = "auto"
    LEGACY = "legacy"
    MODERN = "modern"


class IdentityScheme(StrEnum):
    PER_USER = "per_user"
    SHARED = "shared"


class ProvisionMode(StrEnum):
    ALLOW_ALL = "allow_all"
    ALLOW_SELECTED = "allow_selected"
    BLOCK_ALL = "block_all"


class HostKind(StrEnum):
    TOKEN = "token"  # noqa: S105  a kind of host, not a secret


@dataclass(frozen=True, slots=True)
class Workspace:
    id: WorkspaceId
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Role:
    id: RoleId
    workspace_id: WorkspaceId
    name: str
    description: str
    capabilities: frozenset[Capability]
    builtin: bool
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    id: MemberId
    workspace_id: WorkspaceId
    email: str
    name: str
    status: MemberStatus
    role_id: RoleId
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class OAuthClientSettings:
    registration: OAuthRegistration
    client_id: str | None = None
    scopes: tuple[str, ...] = ()
    authorization_server: str | None = None


@dataclass(frozen=True, slots=True)
class Server:
    id: ServerId
    workspace_id: WorkspaceId
    name: str
    description: str
    transport: Transport
    url: str | None
    command: str | None
    args: tuple[str, ...]
    env: dict[str, str]
    auth_kind: AuthKind
    oauth: OAuthClientSettings | None
    era: ProtocolEra
    connect_timeout_s: float
    call_timeout_s: float
    version: int
    created_at: datetime
    updated_at: datetime
    # The variable a stdio server reads each person's token from; None: BASTION_BEARER_TOKEN.
    token_env: str | None = None
    # How the server is reached, as a digest of every setting but its description: sessions opened under one
    # reach serve calls until it changes (the row's ``version`` also counts description edits).
    reach: str = field(init=False, default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        reached = (
            self.name,
            self.transport,
            self.url,
            self.command,
            self.args,
            sorted(self.env.items()),
            self.auth_kind,
            self.oauth,
            self.era,
            self.connect_timeout_s,
            self.call_timeout_s,
            self.token_env,
        )
        object.__setattr__(self, "reach", hashlib.blake2b(repr(reached).encode(), digest_size=12).hexdigest())


@dataclass(frozen=True, slots=True)
class Provisioning:
    """What of one server a gateway exposes: a mode and, for allow_selected, the names."""

    mode: ProvisionMode = ProvisionMode.ALLOW_ALL
    selected: frozenset[str] = field(default_factory=frozenset[str])

    def allows(self, name: str) -> bool:
        if self.mode is ProvisionMode.ALLOW_ALL:
            return True
        if self.mode is ProvisionMode.BLOCK_ALL:
            return False
        return name in self.selected


@dataclass(frozen=True, slots=True)
class GatewayServer:
    server_id: ServerId
    alias: str
    identity_scheme: IdentityScheme
    shared_identity_id: str | None
    tools: Provisioning
    prompts: Provisioning
    resources: Provisioning
    namespaced: bool = True


@dataclass(frozen=True, slots=True)
class Gateway:
    id: GatewayId
    workspace_id: WorkspaceId
    slug: str
    name: str
    description: str
    enabled: bool
    servers: tuple[GatewayServer, ...]
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Host:
    id: HostId
    workspace_id: WorkspaceId
    name: str
    description: str
    kind: HostKind
    enabled: bool
    webhook_url: str | None
    disabled_at: datetime | None
    disabled_by: MemberId | None
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: ApiKeyId
    workspace_id: WorkspaceId
    member_id: MemberId
    name: str
    last4: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def live_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)
