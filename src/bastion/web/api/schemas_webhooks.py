"""REST bodies and responses for webhook endpoints, their delivery log, host keys and claim redemption."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, SecretStr, StrictBool, StrictFloat

from bastion.domain.webhooks import (
    SUBSCRIBABLE,
    DeliveryInfo,
    Endpoint,
    HostKey,
    MessageInfo,
    MessageStatus,
    TokenDelivery,
    Trigger,
)
from bastion.services.claims import Claimed
from bastion.web.api.schemas import Body, Description, Expiry, Name, Out, Patch, Url

EventTypeName = Annotated[
    str, Field(min_length=1, max_length=32, json_schema_extra={"enum": [t.value for t in SUBSCRIBABLE]})
]
EventTypes = Annotated[
    list[EventTypeName],
    Field(
        min_length=1,
        max_length=len(SUBSCRIBABLE),
        description="Event types to receive (default: all): " + ", ".join(t.value for t in SUBSCRIBABLE),
    ),
]


class EndpointCreate(Body):
    url: Url = Field(description="https URL the events are POSTed to (checked by the outbound policy)")
    description: Description = ""
    event_types: EventTypes | None = None
    token_delivery: TokenDelivery = Field(
        default=TokenDelivery.CLAIM_CODE,
        description="claim_code (default): a one-time code the host redeems with its host key; token: the token",
    )
    enabled: StrictBool = True


class EndpointUpdate(Patch):
    url: Url | None = None
    description: Description | None = None
    event_types: EventTypes | None = None
    token_delivery: TokenDelivery | None = None
    enabled: StrictBool | None = None


class SecretOut(Out):
    id: str
    created_at: datetime
    expires_at: datetime | None = Field(description="Set once superseded: it still signs until then")


class EndpointOut(Out):
    id: str
    host_id: str
    url: str
    description: str
    enabled: bool
    event_types: list[str]
    token_delivery: TokenDelivery
    from_host: bool = Field(description="The endpoint the host's own webhook_url stands for")
    secrets: list[SecretOut] = Field(description="Live signing secrets, newest first (never their values)")
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, e: Endpoint) -> EndpointOut:
        return cls(
            id=e.id,
            host_id=e.host_id,
            url=e.url,
            description=e.description,
            enabled=e.enabled,
            event_types=[t.value for t in e.event_types],
            token_delivery=e.token_delivery,
            from_host=e.from_host,
            secrets=[SecretOut(id=s.id, created_at=s.created_at, expires_at=s.expires_at) for s in e.secrets],
            version=e.version,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )


class EndpointWithSecret(Out):
    endpoint: EndpointOut
    secret: str = Field(description="The new `whsec_…` signing secret. Shown once; configure the receiver now.")


class SecretRotate(Body):
    overlap_hours: StrictFloat = Field(
        default=24, ge=0, le=168, description="How long the previous secret keeps signing too"
    )


class MessageOut(Out):
    id: str
    endpoint_id: str
    event_id: str
    webhook_id: str
    event_type: str
    connection_id: str | None
    version: int
    status: MessageStatus
    attempts: int
    occurred_at: datetime
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    last_error: str | None

    @classmethod
    def of(cls, m: MessageInfo) -> MessageOut:
        return cls.model_validate(m)


class DeliveryOut(Out):
    id: str
    endpoint_id: str
    message_id: str = Field(description="The event (its id in the endpoint's event list)")
    attempt: int
    trigger: Trigger
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
    outcome: str

    @classmethod
    def of(cls, d: DeliveryInfo) -> DeliveryOut:
        return cls.model_validate(d)


class HostKeyCreate(Body):
    name: Name
    expires_at: Expiry | None = None


class HostKeyOut(Out):
    id: str
    host_id: str
    name: str
    last4: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, k: HostKey) -> HostKeyOut:
        return cls.model_validate(k)


class HostKeyCreated(Out):
    key: HostKeyOut
    secret: str = Field(description="The host key (`bsh_…`). Shown once; give it to the agent now.")


class ClaimRedeem(Body):
    claim_code: SecretStr = Field(min_length=1, max_length=64, description="The `bsc_…` code from a webhook event")


class MemberRef(Out):
    id: str
    email: str


class ClaimRedeemed(Out):
    token: str = Field(description="The access token (`bst_…`). This is its only delivery.")
    token_id: str
    connection_id: str
    member: MemberRef
    gateway: str

    @classmethod
    def of(cls, c: Claimed) -> ClaimRedeemed:
        return cls(
            token=c.token,
            token_id=c.token_id,
            connection_id=c.connection_id,
            member=MemberRef(id=c.member_id, email=c.member_email),
            gateway=c.gateway,
        )
