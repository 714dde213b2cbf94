"""Table definitions. The Alembic history must produce exactly this (a test compares them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

ID: Final = 36
metadata: Final = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on engines that keep time zones (PostgreSQL) and those that do not (SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _id() -> sa.Column[Any]:
    return sa.Column("id", sa.String(ID), primary_key=True)


def _workspace() -> sa.Column[Any]:
    return sa.Column("workspace_id", sa.String(ID), sa.ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False)


def _stamps() -> list[sa.Column[Any]]:
    return [
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    ]


workspaces: Final = sa.Table(
    "workspaces",
    metadata,
    _id(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

roles: Final = sa.Table(
    "roles",
    metadata,
    _id(),
    _workspace(),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("capabilities", sa.JSON, nullable=False),
    sa.Column("builtin", sa.Boolean, nullable=False),
    *_stamps(),
    sa.UniqueConstraint("workspace_id", "name"),
)

members: Final = sa.Table(
    "members",
    metadata,
    _id(),
    _workspace(),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("role_id", sa.String(ID), sa.ForeignKey("roles.id", ondelete="RESTRICT"), nullable=False),
    *_stamps(),
    sa.UniqueConstraint("workspace_id", "email"),
    sa.Index("ix_members_role_id", "role_id"),
)

api_keys: Final = sa.Table(
    "api_keys",
    metadata,
    _id(),
    _workspace(),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("last4", sa.String(4), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Index("ix_api_keys_member_id", "member_id"),
)

servers: Final = sa.Table(
    "servers",
    metadata,
    _id(),
    _workspace(),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("transport", sa.String(32), nullable=False),
    sa.Column("url", sa.String(2048), nullable=True),
    sa.Column("command", sa.String(1024), nullable=True),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("auth_kind", sa.String(16), nullable=False),
    sa.Column("oauth", sa.JSON, nullable=True),
    sa.Column("era", sa.String(16), nullable=False),
    sa.Column("connect_timeout_s", sa.Float, nullable=False),
    sa.Column("call_timeout_s", sa.Float, nullable=False),
    *_stamps(),
    sa.UniqueConstraint("workspace_id", "name"),
)

gateways: Final = sa.Table(
    "gateways",
    metadata,
    _id(),
    _workspace(),
    sa.Column("slug", sa.String(63), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    *_stamps(),
    sa.UniqueConstraint("workspace_id", "slug"),
)

gateway_servers: Final = sa.Table(
    "gateway_servers",
    metadata,
    _id(),
    _workspace(),
    sa.Column("gateway_id", sa.String(ID), sa.ForeignKey("gateways.id", ondelete="CASCADE"), nullable=False),
    sa.Column("server_id", sa.String(ID), sa.ForeignKey("servers.id", ondelete="RESTRICT"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("alias", sa.String(63), nullable=False),
    sa.Column("identity_scheme", sa.String(16), nullable=False),
    sa.Column("shared_identity_id", sa.String(ID), nullable=True),
    sa.Column("provisioning", sa.JSON, nullable=False),
    sa.Column("namespaced", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.UniqueConstraint("gateway_id", "alias"),
    sa.Index("ix_gateway_servers_server_id", "server_id"),
)

hosts: Final = sa.Table(
    "hosts",
    metadata,
    _id(),
    _workspace(),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    sa.Column("disabled_at", UTCDateTime(), nullable=True),
    sa.Column("disabled_by", sa.String(ID), nullable=True),
    *_stamps(),
    sa.UniqueConstraint("workspace_id", "name"),
)

# --- the vault, identities, links, connections and access tokens (Map 2) --------------------------------------------

vault_keys: Final = sa.Table(
    "vault_keys",
    metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("seals", sa.BigInteger, nullable=False),
    sa.Column("first_used_at", UTCDateTime(), nullable=False),
    sa.Column("retired_at", UTCDateTime(), nullable=True),
)

identities: Final = sa.Table(
    "identities",
    metadata,
    _id(),
    _workspace(),
    sa.Column("server_id", sa.String(ID), sa.ForeignKey("servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("owner_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("fingerprint", sa.String(16), nullable=False),
    sa.Column("last4", sa.String(4), nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Column("kek_id", sa.String(64), nullable=False),
    sa.Column("dek_wrapped", sa.LargeBinary, nullable=False),
    sa.Column("secret_sealed", sa.LargeBinary, nullable=False),
    *_stamps(),
    sa.Index("ix_identities_owner_server", "owner_id", "server_id"),
    sa.Index("ix_identities_kek_id", "kek_id"),
)

connection_links: Final = sa.Table(
    "connection_links",
    metadata,
    _id(),
    _workspace(),
    sa.Column("host_id", sa.String(ID), sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("gateway_id", sa.String(ID), sa.ForeignKey("gateways.id", ondelete="CASCADE"), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("note", sa.String(200), nullable=False),
    sa.Column("allowed_emails", sa.JSON, nullable=False),
    sa.Column("max_uses", sa.Integer, nullable=True),
    sa.Column("uses", sa.Integer, nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Column("created_by", sa.String(ID), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

connections: Final = sa.Table(
    "connections",
    metadata,
    _id(),
    _workspace(),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
    sa.Column("host_id", sa.String(ID), sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("gateway_id", sa.String(ID), sa.ForeignKey("gateways.id", ondelete="CASCADE"), nullable=False),
    sa.Column("link_id", sa.String(ID), sa.ForeignKey("connection_links.id", ondelete="SET NULL"), nullable=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("disabled_at", UTCDateTime(), nullable=True),
    sa.Column("disabled_by", sa.String(ID), nullable=True),
    *_stamps(),
    sa.Index("ix_connections_member_id", "member_id"),
    sa.Index("ix_connections_host_id", "host_id"),
)

connection_identities: Final = sa.Table(
    "connection_identities",
    metadata,
    _id(),
    _workspace(),
    sa.Column("connection_id", sa.String(ID), sa.ForeignKey("connections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("alias", sa.String(63), nullable=False),
    sa.Column("identity_id", sa.String(ID), sa.ForeignKey("identities.id", ondelete="CASCADE"), nullable=False),
    sa.UniqueConstraint("connection_id", "alias"),
    sa.Index("ix_connection_identities_identity_id", "identity_id"),
)

access_tokens: Final = sa.Table(
    "access_tokens",
    metadata,
    _id(),
    _workspace(),
    sa.Column("connection_id", sa.String(ID), sa.ForeignKey("connections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("last4", sa.String(4), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Index("ix_access_tokens_connection_id", "connection_id"),
)

# --- Policy, content rules and rate limits (all read into memory per workspace; few rows) ---------------------

policy_rules: Final = sa.Table(
    "policy_rules",
    metadata,
    _id(),
    _workspace(),
    sa.Column("effect", sa.String(8), nullable=False),
    sa.Column("subject_kind", sa.String(16), nullable=False),
    sa.Column("subject", sa.String(320), nullable=True),
    sa.Column("gateway_id", sa.String(ID), sa.ForeignKey("gateways.id", ondelete="CASCADE"), nullable=True),
    sa.Column("server", sa.String(63), nullable=True),
    sa.Column("name", sa.String(255), nullable=True),
    sa.Column("description", sa.String(500), nullable=False),
    sa.Column("created_by", sa.String(ID), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

content_rules: Final = sa.Table(
    "content_rules",
    metadata,
    _id(),
    _workspace(),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("gateway_id", sa.String(ID), sa.ForeignKey("gateways.id", ondelete="CASCADE"), nullable=True),
    sa.Column("pattern", sa.String(500), nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("replacement", sa.String(200), nullable=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_by", sa.String(ID), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("workspace_id", "name"),
)

rate_limits: Final = sa.Table(
    "rate_limits",
    metadata,
    _id(),
    _workspace(),
    sa.Column("per", sa.String(16), nullable=False),
    sa.Column("gateway_id", sa.String(ID), sa.ForeignKey("gateways.id", ondelete="CASCADE"), nullable=True),
    sa.Column("name", sa.String(255), nullable=True),
    sa.Column("amount", sa.Integer, nullable=False),
    sa.Column("window_s", sa.Integer, nullable=False),
    sa.Column("strategy", sa.String(16), nullable=False),
    sa.Column("created_by", sa.String(ID), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

# --- The audit log: one chained row per MCP request or admin action -------------------------------------------
# A row is written before anything is forwarded (seq NULL: pending) and enters the hash chain, taking the next
# seq, once its outcome is known. Install-wide like the keyring: one chain, rows carry their workspace.

audit_events: Final = sa.Table(
    "audit_events",
    metadata,
    _id(),
    sa.Column("seq", sa.BigInteger, nullable=True, unique=True),
    sa.Column("prev_hash", sa.String(64), nullable=True),
    sa.Column("hash", sa.String(64), nullable=True),
    sa.Column("occurred_at", UTCDateTime(), nullable=False),
    # Not a foreign key: the log outlives what it speaks of (a deleted workspace, member or host).
    sa.Column("workspace", sa.String(ID), nullable=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("correlation_id", sa.String(64), nullable=True),
    sa.Column("member_id", sa.String(ID), nullable=True),
    sa.Column("actor", sa.String(320), nullable=True),
    sa.Column("host_id", sa.String(ID), nullable=True),
    sa.Column("token_id", sa.String(ID), nullable=True),
    sa.Column("gateway", sa.String(63), nullable=True),
    sa.Column("server", sa.String(63), nullable=True),
    sa.Column("method", sa.String(64), nullable=False),
    sa.Column("name", sa.String(512), nullable=True),
    sa.Column("target", sa.String(255), nullable=True),
    sa.Column("decision", sa.String(8), nullable=True),
    sa.Column("reason", sa.String(500), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("upstream_status", sa.String(32), nullable=True),
    sa.Column("latency_us", sa.BigInteger, nullable=True),
    sa.Column("args_hmac", sa.String(64), nullable=True),
    sa.Column("args_preview", sa.String(1024), nullable=True),
    sa.Column("detail", sa.JSON, nullable=True),
    sa.Index("ix_audit_events_occurred_at", "occurred_at"),
    sa.Index("ix_audit_events_member_id", "member_id"),
    sa.Index("ix_audit_events_outcome", "outcome"),
)

audit_head: Final = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

audit_checkpoints: Final = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("signature", sa.String(64), nullable=False),
)

# --- Enrollment: web sign-in, OAuth clients and states, enrollment drafts ----------------------------------------

member_passwords: Final = sa.Table(
    "member_passwords",
    metadata,
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), primary_key=True),
    _workspace(),
    sa.Column("hash", sa.String(255), nullable=False),
    # Consecutive wrong passwords, and until when sign-in pauses after too many (shared by every replica).
    sa.Column("failed_attempts", sa.Integer, nullable=False),
    sa.Column("locked_until", UTCDateTime(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

# Invitations and admin-issued password reset links: single use, short lived, stored as digests.
member_tickets: Final = sa.Table(
    "member_tickets",
    metadata,
    _id(),
    _workspace(),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("used_at", UTCDateTime(), nullable=True),
    sa.Column("created_by", sa.String(ID), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ix_member_tickets_member_id", "member_id"),
)

web_sessions: Final = sa.Table(
    "web_sessions",
    metadata,
    _id(),
    _workspace(),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("user_agent", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("last_seen_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Index("ix_web_sessions_member_id", "member_id"),
)

# One registration of Bastion as an OAuth client per (server, authorization server issuer).
oauth_clients: Final = sa.Table(
    "oauth_clients",
    metadata,
    _id(),
    _workspace(),
    sa.Column("server_id", sa.String(ID), sa.ForeignKey("servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("issuer", sa.String(2048), nullable=False),
    sa.Column("registration", sa.String(32), nullable=False),
    sa.Column("client_id", sa.String(2048), nullable=False),
    sa.Column("auth_method", sa.String(32), nullable=False),
    sa.Column("redirect_uri", sa.String(2048), nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Column("kek_id", sa.String(64), nullable=True),
    sa.Column("dek_wrapped", sa.LargeBinary, nullable=True),
    sa.Column("secret_sealed", sa.LargeBinary, nullable=True),
    *_stamps(),
    sa.UniqueConstraint("server_id", "issuer"),
    sa.Index("ix_oauth_clients_kek_id", "kek_id"),
)

# Pending authorization requests (connecting an upstream, or signing in with SSO): single use, <= 10 minutes,
# bound to the browser that started them, and in the database so the callback may land on any replica.
oauth_states: Final = sa.Table(
    "oauth_states",
    metadata,
    _id(),
    _workspace(),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("purpose", sa.String(16), nullable=False),
    sa.Column("browser", sa.String(64), nullable=False),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=True),
    sa.Column("server_id", sa.String(ID), sa.ForeignKey("servers.id", ondelete="CASCADE"), nullable=True),
    sa.Column("client_row_id", sa.String(ID), sa.ForeignKey("oauth_clients.id", ondelete="CASCADE"), nullable=True),
    sa.Column("issuer", sa.String(2048), nullable=False),
    sa.Column("redirect_uri", sa.String(2048), nullable=False),
    sa.Column("code_verifier", sa.String(128), nullable=False),
    sa.Column("resource", sa.String(2048), nullable=True),
    sa.Column("scope", sa.String(2048), nullable=True),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("used_at", UTCDateTime(), nullable=True),
    sa.Index("ix_oauth_states_expires_at", "expires_at"),
)

# A person's enrollment in progress: nothing here is an identity or a connection until they approve.
enrollment_drafts: Final = sa.Table(
    "enrollment_drafts",
    metadata,
    _id(),
    _workspace(),
    sa.Column("link_id", sa.String(ID), sa.ForeignKey("connection_links.id", ondelete="CASCADE"), nullable=False),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_id", sa.String(ID), sa.ForeignKey("web_sessions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Index("ix_enrollment_drafts_member_id", "member_id"),
)

draft_identities: Final = sa.Table(
    "draft_identities",
    metadata,
    _id(),
    _workspace(),
    sa.Column("draft_id", sa.String(ID), sa.ForeignKey("enrollment_drafts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("alias", sa.String(63), nullable=False),
    sa.Column("server_id", sa.String(ID), sa.ForeignKey("servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("identity_id", sa.String(ID), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Column("kek_id", sa.String(64), nullable=True),
    sa.Column("dek_wrapped", sa.LargeBinary, nullable=True),
    sa.Column("secret_sealed", sa.LargeBinary, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("draft_id", "alias"),
    sa.Index("ix_draft_identities_kek_id", "kek_id"),
)
