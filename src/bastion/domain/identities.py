"""Identities: one person's (or the workspace's) credential for one server. Secrets never print."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from bastion.errors import ValidationFailed
from bastion.types import MemberId, ServerId, WorkspaceId

MAX_SECRET_CHARS: Final = 16 * 1024
MAX_HEADERS: Final = 16
# Headers a bearer identity may never set: they belong to the transport, not to the credential.
FORBIDDEN_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "mcp-session-id",
        "mcp-protocol-version",
        "accept",
        "cookie2",
        "upgrade",
        "te",
        "trailer",
    }
)


class IdentityKind(StrEnum):
    BEARER = "bearer"
    OAUTH = "oauth"


class IdentityStatus(StrEnum):
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class Identity:
    """What may be shown about an identity: never the secret, only a fingerprint and its last 4 characters."""

    id: str
    workspace_id: WorkspaceId
    server_id: ServerId
    owner_id: MemberId | None
    kind: IdentityKind
    status: IdentityStatus
    label: str
    fingerprint: str
    last4: str
    details: Mapping[str, Any]
    kek_id: str
    version: int
    created_at: datetime
    updated_at: datetime

    @property
    def is_global(self) -> bool:
        return self.owner_id is None


@dataclass(frozen=True, slots=True)
class IdentitySecret:
    """The sealed part. ``repr`` shows only which fields are present."""

    token: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict[str, str], repr=False)
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        present = [name for name in ("token", "headers", "access_token", "refresh_token") if getattr(self, name)]
        return f"IdentitySecret(<{', '.join(present) or 'empty'} hidden>)"

    def to_bytes(self) -> bytes:
        doc = {
            "token": self.token,
            "headers": dict(self.headers),
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
        }
        return json.dumps({k: v for k, v in doc.items() if v}, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> IdentitySecret:
        doc = json.loads(raw.decode("utf-8"))
        return cls(doc.get("token"), doc.get("headers", {}), doc.get("access_token"), doc.get("refresh_token"))

    def outbound_headers(self) -> dict[str, str]:
        """The headers an upstream call carries for this identity."""
        if self.headers:
            return dict(self.headers)
        bearer = self.token or self.access_token
        return {"Authorization": f"Bearer {bearer}"} if bearer else {}

    def primary(self) -> str:
        """The value fingerprints and last-4 are computed from."""
        if self.token or self.access_token:
            return self.token or self.access_token or ""
        return "\n".join(f"{k}:{v}" for k, v in sorted(self.headers.items()))


def bearer_secret(token: str | None = None, headers: Mapping[str, str] | None = None) -> IdentitySecret:
    """Validate a pasted bearer token or header set (exactly one of them)."""
    if (token is None) == (not headers):
        raise ValidationFailed("give either a bearer token or a set of headers", field="token")
    if token is not None:
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token or len(token) > MAX_SECRET_CHARS or any(ord(c) < 33 or ord(c) == 127 for c in token):
            raise ValidationFailed("the token must be 1-16384 printable characters without spaces", field="token")
        return IdentitySecret(token=token)
    headers = headers or {}
    if len(headers) > MAX_HEADERS:
        raise ValidationFailed(f"at most {MAX_HEADERS} headers", field="headers")
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 128:
            raise ValidationFailed(f"header name {name!r} is not valid", field="headers")
        if name.lower() in FORBIDDEN_HEADERS:
            raise ValidationFailed(f"header {name!r} is set by the gateway, not by an identity", field="headers")
        if not value or len(value) > MAX_SECRET_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValidationFailed(f"header {name!r} needs a printable value", field="headers")
        clean[name] = value
    return IdentitySecret(headers=clean)
