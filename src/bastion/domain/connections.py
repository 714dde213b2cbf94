"""Connection links, connections, access tokens, and the Principal a token resolves to (Map 2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from bastion.types import GatewayId, HostId, MemberId, WorkspaceId


@dataclass(frozen=True, slots=True)
class ConnectionLink:
    id: str
    workspace_id: WorkspaceId
    host_id: HostId
    gateway_id: GatewayId
    note: str
    allowed_emails: frozenset[str]
    max_uses: int | None
    uses: int
    expires_at: datetime
    revoked_at: datetime | None
    created_by: MemberId | None
    created_at: datetime

    def state_at(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used_up"
        return "active"

    def admits(self, email: str) -> bool:
        return not self.allowed_emails or email.lower() in self.allowed_emails


@dataclass(frozen=True, slots=True)
class Connection:
    id: str
    workspace_id: WorkspaceId
    member_id: MemberId
    host_id: HostId
    gateway_id: GatewayId
    link_id: str | None
    enabled: bool
    identities: Mapping[str, str]  # gateway server alias -> identity id
    disabled_at: datetime | None
    disabled_by: MemberId | None
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AccessToken:
    id: str
    workspace_id: WorkspaceId
    connection_id: str
    last4: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def state_at(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an access token speaks for: the person, through which host, at which gateway, with which identities."""

    workspace_id: WorkspaceId
    token_id: str
    connection_id: str
    member_id: MemberId
    member_email: str
    host_id: HostId
    host_name: str
    gateway_id: GatewayId
    gateway_slug: str
    identities: Mapping[str, str]  # per-user server alias -> identity id
    expires_at: datetime | None
    role: str = ""  # the member's role name, for policy
