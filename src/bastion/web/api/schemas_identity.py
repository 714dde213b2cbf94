"""REST bodies and responses for identities, connections, tokens, links and the vault. Secrets are SecretStr."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Final

from pydantic import ConfigDict, Field, SecretStr, StrictBool, StrictFloat
from pydantic.config import JsonDict

from bastion.domain import naming
from bastion.domain.connections import AccessToken, ConnectionLink
from bastion.domain.identities import FORBIDDEN_HEADERS, Identity, IdentityKind, IdentityStatus
from bastion.services.links import DEFAULT_LINK_LIFETIME, DEFAULT_MAX_USES, MAX_LINK_LIFETIME, MIN_LINK_LIFETIME
from bastion.services.rotation import KeyUsage
from bastion.web.api.schemas import WHOLE, Body, Email, Expiry, Out, Patch, choices

Ref = Annotated[str, Field(min_length=1, max_length=254)]
_HOUR: Final = timedelta(hours=1)


# A pasted credential is a bearer token or a non-empty set of headers, never both (null stands for left out).
_BY_TOKEN: Final[JsonDict] = {"required": ["token"], "properties": {"token": {"type": "string"}}}
_BY_HEADERS: Final[JsonDict] = {
    "required": ["headers"],
    "properties": {"headers": {"type": "object", "minProperties": 1}},
}
# An update changes the credential only when it names one; then it is one, as when created.
_NO_CREDENTIAL: Final[JsonDict] = {"properties": {"token": {"type": "null"}, "headers": {"type": "null"}}}
# Printable, no white space (a leading "Bearer " is also accepted and dropped).
TOKEN_PATTERN: Final = r"^[^\x00-\x20\x7f]+$"  # noqa: S105  a pattern, not a secret


# Header names an identity may set: letters, digits, '-' and '_', not one the gateway sets itself.
HEADER_NAME_PATTERN: Final = (
    "^(?!(?:" + "|".join(naming.any_case(h) for h in sorted(FORBIDDEN_HEADERS)) + ")$)[A-Za-z0-9_-]+$"
)
SecretToken = Annotated[SecretStr, Field(min_length=1, max_length=16384, json_schema_extra={"pattern": TOKEN_PATTERN})]
HeaderName = Annotated[str, Field(min_length=1, max_length=128, json_schema_extra={"pattern": HEADER_NAME_PATTERN})]
HeaderValue = Annotated[
    SecretStr, Field(min_length=1, max_length=16384, json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f]+$"})
]
# Pydantic states a dict's key pattern as patternProperties; other keys are refused too.
Headers = Annotated[
    dict[HeaderName, HeaderValue], Field(max_length=16, json_schema_extra={"additionalProperties": False})
]


class IdentityCreate(Body):
    model_config = ConfigDict(json_schema_extra=choices(_BY_TOKEN, _BY_HEADERS, exclusive=True))

    server: Ref = Field(description="Server name or id")
    token: SecretToken | None = Field(default=None, description="A bearer token (sent as Authorization: Bearer)")
    headers: Headers | None = None
    member: Ref | None = Field(default=None, description="Owner (id or email); default yourself")
    shared: StrictBool = Field(default=False, description="A global identity for shared schemes")
    label: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class IdentityUpdate(Patch):
    # Null means "not this one" when the other form of credential is sent.
    nullable: ClassVar[frozenset[str]] = frozenset({"token", "headers"})
    model_config = ConfigDict(json_schema_extra=choices(_NO_CREDENTIAL, _BY_TOKEN, _BY_HEADERS, exclusive=True))

    label: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    status: IdentityStatus | None = None
    token: SecretToken | None = None
    headers: Headers | None = None


class IdentityOut(Out):
    id: str
    server_id: str
    owner_id: str | None
    scope: str = Field(description="private (one member) or global")
    kind: IdentityKind
    status: IdentityStatus
    label: str
    fingerprint: str
    last4: str
    details: dict[str, Any]
    key_id: str
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, i: Identity) -> IdentityOut:
        return cls(
            id=i.id,
            server_id=i.server_id,
            owner_id=i.owner_id,
            scope="global" if i.is_global else "private",
            kind=i.kind,
            status=i.status,
            label=i.label,
            fingerprint=i.fingerprint,
            last4=i.last4,
            details=dict(i.details),
            key_id=i.kek_id,
            version=i.version,
            created_at=i.created_at,
            updated_at=i.updated_at,
        )


class AccessTokenOut(Out):
    id: str
    connection_id: str
    last4: str
    state: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: AccessToken) -> AccessTokenOut:
        return cls(
            id=t.id,
            connection_id=t.connection_id,
            last4=t.last4,
            state=t.state_at(datetime.now(UTC)),
            created_at=t.created_at,
            expires_at=t.expires_at,
            revoked_at=t.revoked_at,
            last_used_at=t.last_used_at,
        )


class ConnectionCreate(Body):
    host: Ref
    gateway: Ref
    member: Ref | None = Field(default=None, description="For whom (id or email); default yourself")
    identities: Annotated[
        dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=64)]], Field(max_length=50)
    ] = Field(default_factory=dict, description="Per-user server alias → identity id")
    token_expires_at: Expiry | None = None


class ConnectionIdentityUpdate(Body):
    identity_id: Annotated[str, Field(min_length=1, max_length=64)]


class ConnectionOut(Out):
    id: str
    member_id: str
    host_id: str
    gateway_id: str
    link_id: str | None
    enabled: bool
    identities: dict[str, str]
    disabled_at: datetime | None
    disabled_by: str | None
    version: int
    created_at: datetime
    updated_at: datetime


class ConnectionCreated(Out):
    connection: ConnectionOut
    token: AccessTokenOut
    secret: str = Field(description="The access token (bst_…). Shown once; hand it to the agent now.")


class TokenCreate(Body):
    expires_at: Expiry | None = None


class TokenCreated(Out):
    token: AccessTokenOut
    secret: str = Field(description="The access token (bst_…). Shown once.")


class LinkCreate(Body):
    host: Ref
    gateway: Ref
    # The same bounds the service enforces, stated here so a refusal names the field the client sent.
    expires_in_hours: Annotated[StrictFloat, Field(ge=MIN_LINK_LIFETIME / _HOUR, le=MAX_LINK_LIFETIME / _HOUR)] = (
        DEFAULT_LINK_LIFETIME / _HOUR
    )
    max_uses: Annotated[int, Field(ge=1, le=1_000_000), WHOLE] | None = Field(
        default=DEFAULT_MAX_USES,
        description="How many people may enroll through the link; null (the default) for no limit",
    )
    allowed_emails: Annotated[list[Email], Field(max_length=1000)] = Field(default_factory=list)
    note: Annotated[str, Field(max_length=200)] = ""


class LinkOut(Out):
    id: str
    host_id: str
    gateway_id: str
    note: str
    allowed_emails: list[str]
    max_uses: int | None
    uses: int
    state: str
    expires_at: datetime
    revoked_at: datetime | None
    created_by: str | None
    created_at: datetime

    @classmethod
    def of(cls, link: ConnectionLink, now: datetime) -> LinkOut:
        return cls(
            id=link.id,
            host_id=link.host_id,
            gateway_id=link.gateway_id,
            note=link.note,
            allowed_emails=sorted(link.allowed_emails),
            max_uses=link.max_uses,
            uses=link.uses,
            state=link.state_at(now),
            expires_at=link.expires_at,
            revoked_at=link.revoked_at,
            created_by=link.created_by,
            created_at=link.created_at,
        )


class LinkCreated(Out):
    link: LinkOut
    url: str = Field(description="The enrollment URL to share. Shown once.")


class KeyUsageOut(Out):
    key_id: str
    rows: int
    seals: int
    primary: bool
    in_keyring: bool

    @classmethod
    def of(cls, u: KeyUsage) -> KeyUsageOut:
        return cls(key_id=u.key_id, rows=u.rows, seals=u.seals, primary=u.primary, in_keyring=u.in_keyring)
