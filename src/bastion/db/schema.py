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
    # Since when every identity seal here binds server and owner (db/seals.py): an unbound one is refused after.
    sa.Column("seals_bound_at", UTCDateTime(), nullable=True),
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
    sa.Column("token_env", sa.String(64), nullable=True),
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
    # The version of the host's own webhook events (host.disabled/enabled): one more per event.
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
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
    # Whether the seal binds server_id and owner_id too (vault.sealer.Binding); False only for seals made before.
    sa.Column("sealed_bound", sa.Boolean, nullable=False, server_default=sa.false()),
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
    # The version webhook events about this connection carry: one more per event, so receivers can order them.
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
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
    # When the host was told it expires soon (token.expiring, once), and the token minted to succeed it, if any.
    sa.Column("expiry_noticed_at", UTCDateTime(), nullable=True),
    sa.Column("successor_id", sa.String(ID), nullable=True),
    sa.Index("ix_access_tokens_connection_id", "connection_id"),
    sa.Index("ix_access_tokens_expires_at", "expires_at"),
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
    # Set when another registration took this one's place at its issuer. A row never turns into another
    # client: identities name it (details["oauth_client"]) and keep refreshing with it.
    sa.Column("superseded_at", UTCDateTime(), nullable=True),
    *_stamps(),
    sa.Index("ix_oauth_clients_server_id_issuer", "server_id", "issuer"),
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
    # Cleared when the state is used: a spent verifier is kept nowhere.
    sa.Column("code_verifier", sa.String(128), nullable=True),
    sa.Column("resource", sa.String(2048), nullable=True),
    sa.Column("scope", sa.String(2048), nullable=True),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("used_at", UTCDateTime(), nullable=True),
    sa.Index("ix_oauth_states_expires_at", "expires_at"),
)

# The single sign-on account a member is bound to: recorded at their first SSO sign-in (issuer + subject, the
# provider's stable id for the person); afterwards another subject with the same email is refused.
member_sso_identities: Final = sa.Table(
    "member_sso_identities",
    metadata,
    _id(),
    _workspace(),
    sa.Column("member_id", sa.String(ID), sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
    sa.Column("issuer", sa.String(2048), nullable=False),
    sa.Column("subject", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("member_id", "issuer"),
    sa.UniqueConstraint("issuer", "subject"),
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
    # Set by the approval that claims the draft (a conditional update: only one approval can); the row then stays,
    # without its identities, until it expires, so a second submit is told the enrollment was already approved.
    sa.Column("approved_at", UTCDateTime(), nullable=True),
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
    # The enrolling member, whom the seal binds with server_id as it will bind the identity (as on identities).
    sa.Column("owner_id", sa.String(ID), nullable=True),
    sa.Column("sealed_bound", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("draft_id", "alias"),
    sa.Index("ix_draft_identities_kek_id", "kek_id"),
)

# --- Webhooks: endpoints per host, their signing secrets, the outbox, the delivery log; host keys, claim codes -------

webhook_endpoints: Final = sa.Table(
    "webhook_endpoints",
    metadata,
    _id(),
    _workspace(),
    sa.Column("host_id", sa.String(ID), sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("event_types", sa.JSON, nullable=False),
    sa.Column("token_delivery", sa.String(16), nullable=False),
    # The endpoint the host's own `webhook_url` stands for (kept in step with it).
    sa.Column("from_host", sa.Boolean, nullable=False),
    *_stamps(),
    sa.Index("ix_webhook_endpoints_host_id", "host_id"),
)

# One or two live `whsec_` secrets per endpoint (two while a rotation overlaps), sealed under their own row id.
webhook_secrets: Final = sa.Table(
    "webhook_secrets",
    metadata,
    _id(),
    _workspace(),
    sa.Column("endpoint_id", sa.String(ID), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kek_id", sa.String(64), nullable=False),
    sa.Column("dek_wrapped", sa.LargeBinary, nullable=False),
    sa.Column("secret_sealed", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Index("ix_webhook_secrets_endpoint_id", "endpoint_id"),
    sa.Index("ix_webhook_secrets_kek_id", "kek_id"),
)

# A `bsc_` code stands for one token, for one host: stored as a digest, the token sealed until it is redeemed.
claim_codes: Final = sa.Table(
    "claim_codes",
    metadata,
    _id(),
    _workspace(),
    sa.Column("host_id", sa.String(ID), sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("token_id", sa.String(ID), sa.ForeignKey("access_tokens.id", ondelete="CASCADE"), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("kek_id", sa.String(64), nullable=True),
    sa.Column("dek_wrapped", sa.LargeBinary, nullable=True),
    sa.Column("secret_sealed", sa.LargeBinary, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("redeemed_at", UTCDateTime(), nullable=True),
    sa.Index("ix_claim_codes_token_id", "token_id"),
    sa.Index("ix_claim_codes_kek_id", "kek_id"),
)

# The durable outbox: one row per event per endpoint, written by the transaction that made the change. The token
# or claim code an event carries is sealed under the row id until it is delivered.
webhook_outbox: Final = sa.Table(
    "webhook_outbox",
    metadata,
    _id(),
    _workspace(),
    sa.Column("endpoint_id", sa.String(ID), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    sa.Column("event_id", sa.String(ID), nullable=False),
    sa.Column("event_type", sa.String(32), nullable=False),
    # Not a foreign key: an event outlives the connection it speaks of (token.revoked when it is deleted).
    sa.Column("connection_id", sa.String(ID), nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    # The token the event hands over (not a foreign key either: revoked and deleted tokens are still spoken of).
    sa.Column("token_id", sa.String(ID), nullable=True),
    sa.Column("claim_id", sa.String(ID), sa.ForeignKey("claim_codes.id", ondelete="SET NULL"), nullable=True),
    # What the sealed column holds until delivery: "token" or "claim_code" (NULL: nothing, or erased).
    sa.Column("secret_kind", sa.String(16), nullable=True),
    sa.Column("kek_id", sa.String(64), nullable=True),
    sa.Column("dek_wrapped", sa.LargeBinary, nullable=True),
    sa.Column("secret_sealed", sa.LargeBinary, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("occurred_at", UTCDateTime(), nullable=False),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("first_attempt_at", UTCDateTime(), nullable=True),
    sa.Column("last_attempt_at", UTCDateTime(), nullable=True),
    sa.Column("delivered_at", UTCDateTime(), nullable=True),
    sa.Column("last_error", sa.String(200), nullable=True),
    # A worker's claim on the row while it delivers; another worker may take the row only once the lease ends.
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", UTCDateTime(), nullable=True),
    sa.Index("ix_webhook_outbox_due", "status", "next_attempt_at"),
    sa.Index("ix_webhook_outbox_endpoint_id", "endpoint_id"),
    sa.Index("ix_webhook_outbox_claim_id", "claim_id"),
    sa.Index("ix_webhook_outbox_token_id", "token_id"),
    sa.Index("ix_webhook_outbox_kek_id", "kek_id"),
)

# The delivery log: one row per attempt. Never the body (it may carry a token), only what happened.
webhook_deliveries: Final = sa.Table(
    "webhook_deliveries",
    metadata,
    _id(),
    _workspace(),
    sa.Column("endpoint_id", sa.String(ID), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    sa.Column("message_id", sa.String(ID), sa.ForeignKey("webhook_outbox.id", ondelete="CASCADE"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("attempted_at", UTCDateTime(), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.String(200), nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Index("ix_webhook_deliveries_endpoint_id", "endpoint_id"),
    sa.Index("ix_webhook_deliveries_message_id", "message_id"),
)

# A host's own credential (`bsh_…`), for what the host does itself: redeeming claim codes. Stored as a digest.
host_keys: Final = sa.Table(
    "host_keys",
    metadata,
    _id(),
    _workspace(),
    sa.Column("host_id", sa.String(ID), sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("last4", sa.String(4), nullable=False),
    sa.Column("created_by", sa.String(ID), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Index("ix_host_keys_host_id", "host_id"),
)

# Committed changes, for the other processes on an embedded (SQLite) database: a `bastion` CLI's change reaches a
# running `serve`'s caches through this table (db/changes.py). PostgreSQL uses LISTEN/NOTIFY and leaves it empty.
change_log: Final = sa.Table(
    "change_log",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(16), nullable=False),
    sa.Column("object_id", sa.String(ID), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sqlite_autoincrement=True,
)

# Serving replicas on PostgreSQL, renewed while their change listener is connected (events/replicas.py).
replicas: Final = sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("seen_at", UTCDateTime(), nullable=False),
)
