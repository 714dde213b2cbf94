"""REST bodies and responses. Unknown fields are refused; lengths are bounded."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from bastion.domain.capabilities import CAPABILITY_LABELS, Capability
from bastion.domain.models import (
    AuthKind,
    Gateway,
    IdentityScheme,
    MemberStatus,
    OAuthClientSettings,
    OAuthRegistration,
    ProtocolEra,
    Provisioning,
    ProvisionMode,
    Role,
    Server,
    Transport,
)
from bastion.domain.specs import GatewayServerSpec, GatewaySpec

T = TypeVar("T")
Name = Annotated[str, Field(min_length=1, max_length=200)]
Slug = Annotated[str, Field(min_length=1, max_length=63)]
Description = Annotated[str, Field(max_length=1000)]
Url = Annotated[str, Field(min_length=1, max_length=2048)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Patch(Body):
    """A partial update: an omitted field keeps its value; ``null`` clears only the fields named in ``nullable``."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _null_only_where_clearable(cls, value: Any, info: ValidationInfo) -> Any:
        # Silently ignoring `"name": null` would tell the client its edit worked when nothing changed.
        if value is None and info.field_name not in cls.nullable:
            raise PydanticCustomError("null_not_allowed", "this field cannot be null; leave it out to keep its value")
        return value


class Out(BaseModel):
    """A response body. Most are read straight off the domain object's attributes of the same names."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)

    @classmethod
    def from_domain(cls, obj: Any) -> Self:
        return cls.model_validate(obj)


class PageOut(Out, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page.")


# --- capabilities and roles ---------------------------------------------------------------------------------------


class CapabilityOut(Out):
    name: Capability
    label: str


def capabilities_out() -> list[CapabilityOut]:
    return [CapabilityOut(name=c, label=CAPABILITY_LABELS[c]) for c in Capability]


class RoleCreate(Body):
    name: Slug
    description: Description = ""
    capabilities: Annotated[list[Capability], Field(max_length=64)] = []


class RoleUpdate(Patch):
    name: Slug | None = None
    description: Description | None = None
    capabilities: Annotated[list[Capability], Field(max_length=64)] | None = None


class RoleOut(Out):
    id: str
    name: str
    description: str
    capabilities: list[Capability]
    builtin: bool
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, role: Role) -> RoleOut:
        return cls(
            id=role.id,
            name=role.name,
            description=role.description,
            capabilities=sorted(role.capabilities),
            builtin=role.builtin,
            version=role.version,
            created_at=role.created_at,
            updated_at=role.updated_at,
        )


# --- members --------------------------------------------------------------------------------------------------------


class MemberCreate(Body):
    email: Annotated[str, Field(min_length=3, max_length=254)]
    name: Name
    role: Slug = "member"


class MemberUpdate(Patch):
    email: Annotated[str, Field(min_length=3, max_length=254)] | None = None
    name: Name | None = None
    role: Slug | None = None
    status: MemberStatus | None = None


class MemberOut(Out):
    id: str
    email: str
    name: str
    status: MemberStatus
    role_id: str
    version: int
    created_at: datetime
    updated_at: datetime


class MeOut(Out):
    member: MemberOut
    role: RoleOut


# --- servers --------------------------------------------------------------------------------------------------------


class OAuthSettingsIn(Body):
    registration: OAuthRegistration = OAuthRegistration.AUTO
    client_id: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    scopes: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=50)] = []
    authorization_server: Url | None = None

    def to_domain(self) -> OAuthClientSettings:
        return OAuthClientSettings(self.registration, self.client_id, tuple(self.scopes), self.authorization_server)


class OAuthSettingsOut(Out):
    registration: OAuthRegistration
    client_id: str | None
    scopes: list[str]
    authorization_server: str | None


Arg = Annotated[str, Field(max_length=4096)]
Timeout = Annotated[float, Field(gt=0, le=3600)]
TOKEN_ENV_DESCRIPTION: Final = (
    "stdio only: the environment variable the command reads each person's token from, "  # noqa: S105  a description
    "e.g. GITHUB_PERSONAL_ACCESS_TOKEN. Null: BASTION_BEARER_TOKEN."
)
TokenEnv = Annotated[str, Field(min_length=1, max_length=64, description=TOKEN_ENV_DESCRIPTION)]


class ServerCreate(Body):
    name: Slug
    transport: Transport
    url: Url | None = None
    command: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    args: Annotated[list[Arg], Field(max_length=64)] = []
    env: Annotated[dict[str, Arg], Field(max_length=64)] = {}
    description: Description = ""
    auth_kind: AuthKind = AuthKind.NONE
    oauth: OAuthSettingsIn | None = None
    era: ProtocolEra = ProtocolEra.AUTO
    connect_timeout_s: Timeout = 5.0
    call_timeout_s: Timeout = 60.0
    token_env: TokenEnv | None = None


class ServerUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"url", "command", "args", "env", "oauth", "token_env"})

    name: Slug | None = None
    transport: Transport | None = None
    url: Url | None = None
    command: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    args: Annotated[list[Arg], Field(max_length=64)] | None = None
    env: Annotated[dict[str, Arg], Field(max_length=64)] | None = None
    description: Description | None = None
    auth_kind: AuthKind | None = None
    oauth: OAuthSettingsIn | None = None
    era: ProtocolEra | None = None
    connect_timeout_s: Timeout | None = None
    call_timeout_s: Timeout | None = None
    token_env: TokenEnv | None = None


def server_fields(body: BaseModel, *, partial: bool) -> dict[str, Any]:
    """Body fields as ServerSpec values; ``partial`` keeps only what the client sent (nulls included)."""
    data: dict[str, Any] = {}
    for key in body.model_fields_set if partial else type(body).model_fields:
        value = getattr(body, key)
        if key == "oauth":
            value = value.to_domain() if value is not None else None
        elif key == "args":
            value = tuple(value) if value is not None else ()
        elif key == "env":
            value = dict(value) if value is not None else {}
        elif value is None and key not in ("url", "command", "token_env"):
            continue
        data[key] = value
    return data


class ServerOut(Out):
    id: str
    name: str
    description: str
    transport: Transport
    url: str | None
    command: str | None
    args: list[str]
    env: dict[str, str]
    auth_kind: AuthKind
    oauth: OAuthSettingsOut | None
    era: ProtocolEra
    connect_timeout_s: float
    call_timeout_s: float
    token_env: str | None = Field(description=TOKEN_ENV_DESCRIPTION)
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, s: Server) -> ServerOut:
        oauth = None
        if s.oauth is not None:
            oauth = OAuthSettingsOut(
                registration=s.oauth.registration,
                client_id=s.oauth.client_id,
                scopes=list(s.oauth.scopes),
                authorization_server=s.oauth.authorization_server,
            )
        return cls(
            id=s.id,
            name=s.name,
            description=s.description,
            transport=s.transport,
            url=s.url,
            command=s.command,
            args=list(s.args),
            env=dict(s.env),
            auth_kind=s.auth_kind,
            oauth=oauth,
            era=s.era,
            connect_timeout_s=s.connect_timeout_s,
            call_timeout_s=s.call_timeout_s,
            token_env=s.token_env,
            version=s.version,
            created_at=s.created_at,
            updated_at=s.updated_at,
        )


# --- gateways -------------------------------------------------------------------------------------------------------


class ProvisioningIO(Body):
    mode: ProvisionMode = ProvisionMode.ALLOW_ALL
    selected: Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=1000)] = []

    def to_domain(self) -> Provisioning:
        return Provisioning(self.mode, frozenset(self.selected))

    @classmethod
    def of(cls, p: Provisioning) -> ProvisioningIO:
        return cls(mode=p.mode, selected=sorted(p.selected))


class GatewayServerIO(Body):
    server: Annotated[str, Field(min_length=1, max_length=63, description="Server name or id")]
    alias: Slug | None = Field(default=None, description="Tool namespace; defaults to the server name")
    identity_scheme: IdentityScheme = IdentityScheme.PER_USER
    shared_identity_id: Annotated[str, Field(max_length=36)] | None = None
    tools: ProvisioningIO = ProvisioningIO()
    prompts: ProvisioningIO = ProvisioningIO()
    resources: ProvisioningIO = ProvisioningIO()
    namespaced: bool = Field(
        default=True, description="Prefix names with `alias__`; at most one server per gateway may turn this off"
    )

    def to_domain(self) -> GatewayServerSpec:
        return GatewayServerSpec(
            self.server,
            self.alias,
            self.identity_scheme,
            self.shared_identity_id,
            self.tools.to_domain(),
            self.prompts.to_domain(),
            self.resources.to_domain(),
            self.namespaced,
        )

    @classmethod
    def of(cls, s: GatewayServerSpec) -> GatewayServerIO:
        return cls(
            server=s.server,
            alias=s.alias,
            identity_scheme=s.identity_scheme,
            shared_identity_id=s.shared_identity_id,
            tools=ProvisioningIO.of(s.tools),
            prompts=ProvisioningIO.of(s.prompts),
            resources=ProvisioningIO.of(s.resources),
            namespaced=s.namespaced,
        )


class GatewayCreate(Body):
    slug: Slug
    name: Annotated[str, Field(max_length=200)] = ""
    description: Description = ""
    enabled: bool = True
    servers: Annotated[list[GatewayServerIO], Field(max_length=50)] = []

    def to_domain(self) -> GatewaySpec:
        return GatewaySpec(
            self.slug, self.name, self.description, self.enabled, tuple(s.to_domain() for s in self.servers)
        )


class GatewayUpdate(Patch):
    slug: Slug | None = None
    name: Name | None = None
    description: Description | None = None
    enabled: bool | None = None
    servers: Annotated[list[GatewayServerIO], Field(max_length=50)] | None = None

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.model_fields_set:
            value = getattr(self, key)
            if value is None:
                continue
            out[key] = tuple(s.to_domain() for s in self.servers or ()) if key == "servers" else value
        return out


class GatewayOut(Out):
    id: str
    slug: str
    name: str
    description: str
    enabled: bool
    url_path: str
    servers: list[GatewayServerIO]
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, g: Gateway, spec: GatewaySpec) -> GatewayOut:
        return cls(
            id=g.id,
            slug=g.slug,
            name=g.name,
            description=g.description,
            enabled=g.enabled,
            url_path=f"/g/{g.slug}/mcp",
            servers=[GatewayServerIO.of(s) for s in spec.servers],
            version=g.version,
            created_at=g.created_at,
            updated_at=g.updated_at,
        )


# --- hosts ----------------------------------------------------------------------------------------------------------


class HostCreate(Body):
    name: Slug
    description: Description = ""
    webhook_url: Url | None = None


class HostUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"webhook_url"})

    name: Slug | None = None
    description: Description | None = None
    webhook_url: Url | None = None


class HostOut(Out):
    id: str
    name: str
    description: str
    kind: str
    enabled: bool
    webhook_url: str | None
    disabled_at: datetime | None
    disabled_by: str | None
    version: int
    created_at: datetime
    updated_at: datetime


# --- API keys -------------------------------------------------------------------------------------------------------


class ApiKeyCreate(Body):
    name: Name
    expires_at: datetime | None = None


class ApiKeyOut(Out):
    id: str
    member_id: str
    name: str
    last4: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(Out):
    key: ApiKeyOut
    secret: str = Field(description="The key itself. Shown once; store it now.")
