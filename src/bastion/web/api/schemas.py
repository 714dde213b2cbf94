"""REST bodies and responses. Unknown fields are refused; lengths are bounded."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Generic, Self, TypeVar, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StrictFloat,
    ValidationInfo,
    field_validator,
)
from pydantic.config import JsonDict, JsonValue
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from bastion.domain import naming
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
from bastion.domain.specs import RUNTIME_ENV, RUNTIME_ENV_PREFIXES, GatewayServerSpec, GatewaySpec
from bastion.web.api.openapi import NO_NUL

T = TypeVar("T")
# The document states the rules the services apply (bastion.domain.naming), as patterns; the services check them
# with their own messages.
Name = Annotated[str, Field(min_length=1, max_length=200, json_schema_extra={"pattern": naming.DISPLAY_NAME_PATTERN})]
Slug = Annotated[str, Field(min_length=1, max_length=63, json_schema_extra={"pattern": naming.SLUG_PATTERN})]
ServerName = Annotated[
    str, Field(min_length=1, max_length=63, json_schema_extra={"pattern": naming.SERVER_NAME_PATTERN})
]
Email = Annotated[str, Field(min_length=3, max_length=254, json_schema_extra={"pattern": naming.EMAIL_PATTERN})]
Description = Annotated[str, Field(max_length=1000)]
_NUMBER_RE: Final = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def _not_a_number(value: Any) -> Any:
    # A date-time is written out (RFC 3339), as the document says; a bare number is not read as a Unix time.
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER_RE.fullmatch(value)):
        raise ValueError("give a date and time like 2026-01-31T12:00:00Z, not a number")
    return value


Moment = Annotated[datetime, BeforeValidator(_not_a_number)]


def _json_integer(value: Any) -> Any:
    # A JSON integer, which may be written 3 or 3.0; not true, "3" or 3.5.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("must be a whole number")
    return int(value)


# After a field's bounds: Annotated[int, Field(ge=1), WHOLE] (placed first, the bounds would leave the document).
WHOLE: Final = BeforeValidator(_json_integer)
EXPIRY_DESCRIPTION: Final = "When it stops working: in the future and within ten years; null for never"
Expiry = Annotated[Moment, Field(description=EXPIRY_DESCRIPTION)]
# Any URL the outbound policy allows is accepted; the document names the usual form, an https URL naming a host.
Url = Annotated[
    str,
    Field(min_length=1, max_length=2048, json_schema_extra={"pattern": naming.HTTPS_URL_PATTERN, "format": "uri"}),
]


def choices(*branches: JsonDict, exclusive: bool = False) -> Callable[[JsonDict], None]:
    """A ``json_schema_extra`` stating that a body is one of ``branches`` (exactly one when ``exclusive``).

    A branch names only what it adds (``required`` names, and per-property constraints); each is written out as
    the whole body schema with those additions, so that a reader or a generator that takes one branch alone still
    meets every other rule of the body.
    """

    def apply(schema: JsonDict) -> None:
        schema["oneOf" if exclusive else "anyOf"] = [_whole(schema, branch) for branch in branches]

    return apply


def each_of(*alternatives: Sequence[JsonDict]) -> list[JsonDict]:
    """Every combination of one branch from each of ``alternatives`` (rules that hold together)."""
    combined: list[JsonDict] = [{}]
    for branches in alternatives:
        combined = [_merge(done, branch) for done in combined for branch in branches]
    return combined


def _merge(first: JsonDict, second: JsonDict) -> JsonDict:
    properties: dict[str, JsonValue] = {}
    for part in (first, second):
        for name, rule in _mapping(part.get("properties")).items():
            properties[name] = {"allOf": [properties[name], rule]} if name in properties else rule
    required = [*_names(first.get("required")), *_names(second.get("required"))]
    return {"required": list(dict.fromkeys(required)), "properties": properties}


def _whole(schema: JsonDict, branch: JsonDict) -> JsonDict:
    base: JsonDict = {
        k: v for k, v in schema.items() if k in ("type", "properties", "required", "additionalProperties")
    }
    merged = _merge(base, branch)
    whole: JsonDict = {"type": "object", "properties": merged["properties"]}
    if merged["required"]:
        whole["required"] = merged["required"]
    if "additionalProperties" in schema:
        whole["additionalProperties"] = schema["additionalProperties"]
    return whole


def _mapping(value: JsonValue | None) -> dict[str, JsonValue]:
    return value if isinstance(value, dict) else {}


def _names(value: JsonValue | None) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


class Body(BaseModel):
    """A request body. Unknown fields are refused, and so is text holding NUL, which no database stores."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        document = handler(core_schema)
        _no_nul(handler.resolve_ref_schema(document))
        return document

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_nul(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise PydanticCustomError("nul_character", "text must not contain NUL characters")
        return value


def _no_nul(node: object) -> None:
    """Every string ``node`` describes (values and property names) states that it holds no NUL."""
    if isinstance(node, list):
        for item in cast(list[object], node):
            _no_nul(item)
        return
    if not isinstance(node, dict):
        return
    schema = cast(dict[str, object], node)
    if schema.get("type") == "string" and not {"pattern", "enum", "const"} & schema.keys():
        schema["pattern"] = NO_NUL
    names = schema.get("propertyNames")
    if isinstance(names, dict) and "pattern" not in names:
        cast(dict[str, object], names)["pattern"] = NO_NUL
    for value in schema.values():
        _no_nul(value)


def _holds_nul(data: object) -> bool:
    if isinstance(data, str):
        return "\x00" in data
    if isinstance(data, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in cast(dict[object, object], data).items())
    if isinstance(data, list | tuple):
        return any(_holds_nul(v) for v in cast(list[object], data))
    return False


class Patch(Body):
    """A partial update: an omitted field keeps its value; ``null`` clears only the fields named in ``nullable``."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The document allows null only where it clears a field: elsewhere a null is refused, not ignored."""
        document = super().__get_pydantic_json_schema__(core_schema, handler)
        resolved = handler.resolve_ref_schema(document)
        for name, prop in resolved.get("properties", {}).items():
            if name in cls.nullable or "anyOf" not in prop:
                continue
            kept = [option for option in prop["anyOf"] if option.get("type") != "null"]
            if len(kept) == 1:
                del prop["anyOf"]
                prop.update(kept[0])
            else:
                prop["anyOf"] = kept
        return document

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
    email: Email
    name: Name
    role: Slug = "member"


class MemberUpdate(Patch):
    email: Email | None = None
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
    model_config = ConfigDict(  # a pre-registered client names its client_id
        json_schema_extra=choices(
            {"properties": {"registration": {"not": {"const": OAuthRegistration.PRE_REGISTERED.value}}}},
            {"required": ["client_id"], "properties": {"client_id": {"type": "string"}}},
        )
    )

    registration: OAuthRegistration = OAuthRegistration.AUTO
    client_id: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    scopes: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200, json_schema_extra={"pattern": "^[^ \\x00]+$"})]],
        Field(max_length=50),
    ] = []
    authorization_server: Url | None = None

    def to_domain(self) -> OAuthClientSettings:
        return OAuthClientSettings(self.registration, self.client_id, tuple(self.scopes), self.authorization_server)


class OAuthSettingsOut(Out):
    registration: OAuthRegistration
    client_id: str | None
    scopes: list[str]
    authorization_server: str | None


Arg = Annotated[str, Field(max_length=4096, json_schema_extra={"pattern": r"^[^\x00]*$"})]
Timeout = Annotated[StrictFloat, Field(gt=0, le=3600)]
TOKEN_ENV_DESCRIPTION: Final = (
    "stdio only: the environment variable the command reads each person's token from, "  # noqa: S105  a description
    "e.g. GITHUB_PERSONAL_ACCESS_TOKEN. Null: BASTION_BEARER_TOKEN."
)
# An environment variable name that does not change how the command runs (specs.changes_how_commands_run).
_RUNTIME: Final = "|".join(
    [*(naming.any_case(p) for p in RUNTIME_ENV_PREFIXES), *(naming.any_case(n) + "$" for n in sorted(RUNTIME_ENV))]
)
TOKEN_ENV_PATTERN: Final = rf"^(?!(?:{_RUNTIME}))[A-Za-z_][A-Za-z0-9_]*$"
TokenEnv = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        description=TOKEN_ENV_DESCRIPTION,
        json_schema_extra={"pattern": TOKEN_ENV_PATTERN},
    ),
]


# A stdio server runs a command (no url, no OAuth); an HTTP or SSE server has a url and no command, args or
# token_env. OAuth settings go with auth_kind oauth. Null stands for left out.
_NULL: Final[JsonDict] = {"type": "null"}
_TRANSPORT_RULES: Final[list[JsonDict]] = [
    {
        "required": ["transport", "command"],
        "properties": {
            "transport": {"const": Transport.STDIO.value},
            "command": {"type": "string", "pattern": rf"^[^\x00]*[^\x00{naming.SPACES}][^\x00]*$"},
            "url": _NULL,
            "auth_kind": {"enum": [AuthKind.NONE.value, AuthKind.BEARER.value]},
        },
    },
    {
        "required": ["transport", "url"],
        "properties": {
            "transport": {"enum": [Transport.STREAMABLE_HTTP.value, Transport.SSE.value]},
            "url": {"type": "string"},
            "command": _NULL,
            "args": {"maxItems": 0},
            "token_env": _NULL,
        },
    },
]
_OAUTH_RULES: Final[list[JsonDict]] = [
    {"required": ["auth_kind"], "properties": {"auth_kind": {"const": AuthKind.OAUTH.value}}},
    {"properties": {"oauth": _NULL}},
]
EnvName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# Pydantic states a dict's key pattern as patternProperties; other keys are refused too.
Env = Annotated[dict[EnvName, Arg], Field(max_length=64, json_schema_extra={"additionalProperties": False})]


class ServerCreate(Body):
    model_config = ConfigDict(json_schema_extra=choices(*each_of(_TRANSPORT_RULES, _OAUTH_RULES)))

    name: ServerName
    transport: Transport
    url: Url | None = None
    command: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    args: Annotated[list[Arg], Field(max_length=64)] = []
    env: Env = {}
    description: Description = ""
    auth_kind: AuthKind = AuthKind.NONE
    oauth: OAuthSettingsIn | None = None
    era: ProtocolEra = ProtocolEra.AUTO
    connect_timeout_s: Timeout = 5.0
    call_timeout_s: Timeout = 60.0
    token_env: TokenEnv | None = None


# An update that changes the transport brings what the new one needs (the old one's settings are dropped); one
# that does not gives either a url or a command, never both. Leaving OAuth drops the OAuth settings.
_TRANSPORT_CHANGES: Final[list[JsonDict]] = [
    {"properties": {"transport": {"not": {}}, "url": _NULL}},
    {"properties": {"transport": {"not": {}}, "command": _NULL}},
    {
        "required": ["transport", "command"],
        "properties": {
            "transport": {"const": Transport.STDIO.value},
            "command": {"type": "string"},
            "url": _NULL,
            "auth_kind": {"enum": [AuthKind.NONE.value, AuthKind.BEARER.value]},
        },
    },
    {
        "required": ["transport"],
        "properties": {
            "transport": {"enum": [Transport.STREAMABLE_HTTP.value, Transport.SSE.value]},
            "url": {"type": "string"},
            "command": _NULL,
            "args": {"anyOf": [_NULL, {"maxItems": 0}]},
            "token_env": _NULL,
        },
    },
]
_AUTH_CHANGES: Final[list[JsonDict]] = [
    {"properties": {"auth_kind": {"not": {}}}},
    {"required": ["auth_kind"], "properties": {"auth_kind": {"const": AuthKind.OAUTH.value}}},
    {"properties": {"oauth": _NULL}},
]


class ServerUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"url", "command", "args", "env", "oauth", "token_env"})
    model_config = ConfigDict(json_schema_extra=choices(*each_of(_TRANSPORT_CHANGES, _AUTH_CHANGES)))

    name: ServerName | None = None
    transport: Transport | None = None
    url: Url | None = None
    command: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    args: Annotated[list[Arg], Field(max_length=64)] | None = None
    env: Env | None = None
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
    model_config = ConfigDict(  # names are given only to allow those
        json_schema_extra=choices(
            {"required": ["mode"], "properties": {"mode": {"const": ProvisionMode.ALLOW_SELECTED.value}}},
            {"properties": {"selected": {"maxItems": 0}}},
        )
    )
    mode: ProvisionMode = ProvisionMode.ALLOW_ALL
    selected: Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=1000)] = []

    def to_domain(self) -> Provisioning:
        return Provisioning(self.mode, frozenset(self.selected))

    @classmethod
    def of(cls, p: Provisioning) -> ProvisioningIO:
        return cls(mode=p.mode, selected=sorted(p.selected))


class GatewayServerIO(Body):
    model_config = ConfigDict(  # a shared scheme names its global identity; a per-user one names none
        json_schema_extra=choices(
            {
                "required": ["identity_scheme", "shared_identity_id"],
                "properties": {
                    "identity_scheme": {"const": IdentityScheme.SHARED.value},
                    "shared_identity_id": {"type": "string", "minLength": 1},
                },
            },
            {
                "properties": {
                    "identity_scheme": {"const": IdentityScheme.PER_USER.value},
                    "shared_identity_id": {"anyOf": [_NULL, {"type": "string", "maxLength": 0}]},
                }
            },
        )
    )
    server: ServerName = Field(description="Server name or id")
    alias: ServerName | None = Field(default=None, description="Tool namespace; defaults to the server name")
    identity_scheme: IdentityScheme = IdentityScheme.PER_USER
    shared_identity_id: Annotated[str, Field(max_length=36)] | None = None
    tools: ProvisioningIO = ProvisioningIO()
    prompts: ProvisioningIO = ProvisioningIO()
    resources: ProvisioningIO = ProvisioningIO()
    namespaced: StrictBool = Field(
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
    name: Annotated[
        str,
        Field(
            max_length=200,
            description="Defaults to the slug",
            json_schema_extra={"pattern": f"^$|{naming.DISPLAY_NAME_PATTERN}"},
        ),
    ] = ""
    description: Description = ""
    enabled: StrictBool = True
    servers: Annotated[list[GatewayServerIO], Field(max_length=50)] = []

    def to_domain(self) -> GatewaySpec:
        return GatewaySpec(
            self.slug, self.name, self.description, self.enabled, tuple(s.to_domain() for s in self.servers)
        )


class GatewayUpdate(Patch):
    slug: Slug | None = None
    name: Name | None = None
    description: Description | None = None
    enabled: StrictBool | None = None
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
    expires_at: Expiry | None = None


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
