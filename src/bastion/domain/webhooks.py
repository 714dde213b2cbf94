"""Webhooks as data: event types, Standard Webhooks v1 signing, the event body, and the retry schedule.

Signing follows Standard Webhooks v1: ``webhook-id`` (stable per event, the same on every retry),
``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` over
``{id}.{timestamp}.{body}`` with the secret's bytes, one signature per live secret (two while a rotation overlaps).
Retries back off exponentially with full jitter and go on for at least ``RETRY_WINDOW`` after the first attempt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from bastion.errors import ValidationFailed
from bastion.types import JSONObject, JSONValue

SECRET_PREFIX: Final = "whsec_"  # noqa: S105  a prefix, not a secret
SECRET_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
MESSAGE_ID_PREFIX: Final = "msg_"
# How long the previous secret keeps signing after a rotation, unless an admin retires it sooner.
DEFAULT_ROTATION_OVERLAP: Final = timedelta(hours=24)
MAX_ROTATION_OVERLAP: Final = timedelta(days=7)
CLAIM_CODE_LIFETIME: Final = timedelta(minutes=10)

RETRY_BASE: Final = timedelta(seconds=5)
RETRY_CAP: Final = timedelta(hours=1)
RETRY_FLOOR: Final = timedelta(seconds=1)  # full jitter may draw ~0: never retry in a tight loop
RETRY_WINDOW: Final = timedelta(hours=24)
CONNECT_TIMEOUT_S: Final = 5.0
TOTAL_TIMEOUT_S: Final = 15.0
MAX_ERROR_CHARS: Final = 200


class EventType(StrEnum):
    CONNECTION_CREATED = "connection.created"
    TOKEN_MINTED = "token.minted"  # noqa: S105  an event name, not a secret
    TOKEN_REVOKED = "token.revoked"  # noqa: S105  an event name, not a secret
    TOKEN_EXPIRING = "token.expiring"  # noqa: S105  an event name, not a secret
    CONNECTION_DISABLED = "connection.disabled"
    CONNECTION_ENABLED = "connection.enabled"
    HOST_DISABLED = "host.disabled"
    HOST_ENABLED = "host.enabled"
    TEST = "webhook.test"


# What an endpoint may subscribe to (the test event goes to whichever endpoint is tested).
SUBSCRIBABLE: Final = tuple(t for t in EventType if t is not EventType.TEST)
# Events that hand the agent a token (or a claim code for it).
CARRIES_TOKEN: Final = frozenset({EventType.CONNECTION_CREATED, EventType.TOKEN_MINTED})


class TokenDelivery(StrEnum):
    CLAIM_CODE = "claim_code"  # the safer default: a one-time code the host redeems with its own key
    TOKEN = "token"  # noqa: S105  a delivery mode, not a secret


class MessageStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Trigger(StrEnum):
    """Why an attempt was made: the schedule, an admin's redeliver, or the test command."""

    SCHEDULED = "scheduled"
    MANUAL = "manual"
    TEST = "test"


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """A signing secret as it may be shown: when it was made and, once superseded, until when it still signs."""

    id: str
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a host's events go. ``from_host``: the endpoint the host's own ``webhook_url`` stands for."""

    id: str
    workspace_id: str
    host_id: str
    url: str
    description: str
    enabled: bool
    event_types: tuple[EventType, ...]
    token_delivery: TokenDelivery
    from_host: bool
    secrets: tuple[SecretInfo, ...]
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One event for one endpoint, as the delivery log shows it (never its body: it may carry a token)."""

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


@dataclass(frozen=True, slots=True)
class DeliveryInfo:
    """One attempt: when, why, how it went (status code or a short error class) and how long it took."""

    id: str
    endpoint_id: str
    message_id: str
    attempt: int
    trigger: Trigger
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
    outcome: str


def event_types(values: Iterable[str] | None) -> tuple[EventType, ...]:
    """Subscribed event types, in catalogue order; ``None`` is every type. Unknown or no types are an error."""
    if values is None:
        return SUBSCRIBABLE
    wanted = set(values)
    unknown = sorted(wanted - {t.value for t in SUBSCRIBABLE})
    if unknown:
        known = ", ".join(t.value for t in SUBSCRIBABLE)
        raise ValidationFailed(f"unknown event type {unknown[0]!r}; known: {known}", field="event_types")
    if not wanted:
        raise ValidationFailed("subscribe to at least one event type", field="event_types")
    return tuple(t for t in SUBSCRIBABLE if t.value in wanted)


# --- secrets and signatures -----------------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key a ``whsec_`` secret stands for.

    Raises:
        ValidationFailed: not a ``whsec_`` secret of 24 to 64 bytes (never echoing it).
    """
    body = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(body, validate=True) if secret.startswith(SECRET_PREFIX) else b""
    except (binascii.Error, ValueError):
        key = b""
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValidationFailed(
            f"a signing secret is {SECRET_PREFIX} and base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes",
            field="secret",
        )
    return key


def message_id(event_id: str) -> str:
    """The ``webhook-id`` of an event: the same for every endpoint and every attempt."""
    return MESSAGE_ID_PREFIX + event_id


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``{msg_id}.{timestamp}.{body}``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret_key(secret), signed, hashlib.sha256).digest()).decode("ascii")


def signed_headers(live_secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed with every live secret (newest first)."""
    signatures = [sign(s, msg_id, timestamp, body) for s in live_secrets]
    if not signatures:
        raise ValueError("an event cannot be signed without a secret")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


# --- the event body -------------------------------------------------------------------------------------------------


def iso(instant: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, as the body carries instants."""
    return instant.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class EventSubject:
    """What an event is about, without its secrets (those are added at delivery, from the sealed column)."""

    host: str
    gateway: str | None = None
    connection_id: str | None = None
    member_id: str | None = None
    member_email: str | None = None
    token_id: str | None = None
    # token.expiring only: when the token expires, and the token minted to succeed it (None: none was).
    expires_at: datetime | None = None
    successor_token_id: str | None = None


def payload(
    event_type: EventType, event_id: str, occurred_at: datetime, subject: EventSubject, version: int
) -> JSONObject:
    """The body an event is stored with: every field of the wire format, the secret ones still null."""
    member: JSONValue = (
        {"id": subject.member_id, "email": subject.member_email} if subject.member_id is not None else None
    )
    return {
        "type": event_type.value,
        "timestamp": iso(occurred_at),
        "data": {
            "event_id": event_id,
            "host": subject.host,
            "gateway": subject.gateway,
            "connection_id": subject.connection_id,
            "version": version,
            "member": member,
            "token": None,
            "token_id": subject.token_id,
            "claim_code": None,
            "claim_expires_at": None,
            "mcp_url": None,
            **_expiring(event_type, subject),
        },
    }


def _expiring(event_type: EventType, subject: EventSubject) -> JSONObject:
    if event_type is not EventType.TOKEN_EXPIRING:
        return {}
    expires_at = iso(subject.expires_at) if subject.expires_at is not None else None
    return {"expires_at": expires_at, "successor_token_id": subject.successor_token_id}


def body_bytes(
    stored: Mapping[str, JSONValue],
    *,
    public_url: str | None,
    token: str | None = None,
    claim_code: str | None = None,
    claim_expires_at: datetime | None = None,
) -> bytes:
    """The exact bytes one attempt sends (and signs): the stored body with the secret and the gateway URL filled in."""
    data = stored.get("data")
    filled: JSONObject = dict(data) if isinstance(data, dict) else {}
    gateway = filled.get("gateway")
    filled["token"] = token
    filled["claim_code"] = claim_code
    filled["claim_expires_at"] = iso(claim_expires_at) if claim_expires_at is not None else None
    filled["mcp_url"] = f"{public_url.rstrip('/')}/g/{gateway}/mcp" if public_url and isinstance(gateway, str) else None
    return json.dumps({**stored, "data": filled}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- attempts and the retry schedule --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one delivery attempt came to. ``error`` is a short class of failure, never a body or a secret."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300

    @property
    def endpoint_down(self) -> bool:
        """The endpoint, not this event, is at fault: its later events wait behind this one rather than fail too."""
        if self.delivered:
            return False
        code = self.status_code
        return code is None or code >= 500 or code == 429 or 300 <= code < 400


def answered(status_code: int, duration_ms: int) -> Attempt:
    """The receiver answered: 2xx is delivered; a redirect is a failure (never followed), as is any other status."""
    if 200 <= status_code < 300:
        return Attempt(status_code, None, duration_ms)
    kind = "redirect" if 300 <= status_code < 400 else "http_status"
    return Attempt(status_code, f"{kind} {status_code}", duration_ms)


def failed(error: str, duration_ms: int) -> Attempt:
    return Attempt(None, error[:MAX_ERROR_CHARS], duration_ms)


def retry_delay(failures: int, rng: random.Random) -> timedelta:
    """The wait after the ``failures``-th failure in a row: full jitter, uniform in [0, min(cap, base * 2^(n-1))]."""
    exponent = min(max(failures, 1) - 1, 32)
    ceiling = min(RETRY_CAP, RETRY_BASE * 2**exponent)
    return max(RETRY_FLOOR, ceiling * rng.random())


def next_attempt_at(now: datetime, first_attempt_at: datetime, failures: int, rng: random.Random) -> datetime | None:
    """When to try again after a failure, or None to give up: retries go on until ``RETRY_WINDOW`` has passed."""
    if now - first_attempt_at >= RETRY_WINDOW:
        return None
    return now + retry_delay(failures, rng)


# --- host credentials -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostKey:
    """A host's own credential (``bsh_…``) as it may be shown: never the key, only its last 4 characters."""

    id: str
    workspace_id: str
    host_id: str
    name: str
    last4: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def live_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class HostCaller:
    """Who presented a live host key: the host acting for itself (redeeming the claim codes sent to it)."""

    workspace_id: str
    host_id: str
    host_name: str
    key_id: str
