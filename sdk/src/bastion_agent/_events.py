"""The events Bastion sends to a host's webhook, parsed from the JSON body into a typed, secret-safe value."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast, get_args

EventType = Literal[
    "connection.created",
    "token.minted",
    "token.revoked",
    "token.expiring",
    "connection.disabled",
    "connection.enabled",
    "host.disabled",
    "host.enabled",
    "webhook.test",
]
HOST_EVENTS: Final[frozenset[str]] = frozenset({"host.disabled", "host.enabled"})
# Every other event but webhook.test is about one person's connection (and names it, and them).
CONNECTION_EVENTS: Final[frozenset[str]] = frozenset(get_args(EventType)) - HOST_EVENTS - {"webhook.test"}
MAX_BODY_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Member:
    """The person an event is about: their stable member id and their email (which may change)."""

    id: str
    email: str


@dataclass(frozen=True, slots=True)
class Event:
    """One webhook event. ``token`` and ``claim_code`` are secrets: they stay out of ``repr``."""

    type: str
    timestamp: str
    event_id: str
    host: str
    version: int
    gateway: str | None = None
    connection_id: str | None = None
    member: Member | None = None
    token_id: str | None = None
    mcp_url: str | None = None
    claim_expires_at: str | None = None
    # token.expiring: when ``token_id`` expires, and the token minted to succeed it (delivered as token.minted).
    expires_at: str | None = None
    successor_token_id: str | None = None
    token: str | None = field(default=None, repr=False)
    claim_code: str | None = field(default=None, repr=False)


def _required(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"event field {name!r} must be a non-empty string")
    return value


def _text(data: dict[str, Any], name: str) -> str | None:
    return None if data.get(name) is None else _required(data, name)


def _member(data: dict[str, Any]) -> Member | None:
    raw = data.get("member")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("event field 'member' must be an object")
    member = cast("dict[str, Any]", raw)
    return Member(_required(member, "id"), _required(member, "email"))


def parse_event(body: bytes) -> Event:
    """The event in a (verified) webhook body.

    Raises:
        ValueError: not JSON, or a field of the wrong type, or a connection or host event missing what it needs.
    """
    try:
        raw: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the webhook body is not JSON") from None
    top = cast("dict[str, Any]", raw) if isinstance(raw, dict) else {}
    if not isinstance(top.get("data"), dict):
        raise ValueError("the webhook body has no 'data' object")
    data = cast("dict[str, Any]", top["data"])
    kind = _required(top, "type")
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError("event field 'version' must be a non-negative integer")
    event = Event(
        type=kind,
        timestamp=_text(top, "timestamp") or "",
        event_id=_text(data, "event_id") or "",
        host=_text(data, "host") or "",
        version=version,
        gateway=_text(data, "gateway"),
        connection_id=_text(data, "connection_id"),
        member=_member(data),
        token_id=_text(data, "token_id"),
        mcp_url=_text(data, "mcp_url"),
        claim_expires_at=_text(data, "claim_expires_at"),
        expires_at=_text(data, "expires_at"),
        successor_token_id=_text(data, "successor_token_id"),
        token=_text(data, "token"),
        claim_code=_text(data, "claim_code"),
    )
    if kind in CONNECTION_EVENTS and (event.connection_id is None or event.member is None or not event.host):
        raise ValueError(f"a {kind} event names its host, connection and member")
    if kind in HOST_EVENTS and not event.host:
        raise ValueError(f"a {kind} event names its host")
    if kind in ("token.revoked", "token.expiring") and event.token_id is None:
        raise ValueError(f"a {kind} event names the token")
    if event.token is not None and event.token_id is None:
        raise ValueError("an event carrying a token names its token id")
    return event
