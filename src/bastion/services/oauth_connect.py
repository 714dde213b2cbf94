"""Connecting a member's identity at an upstream with OAuth 2.1: ``begin`` sends the browser off, ``complete``
takes it back.

``begin`` discovers how the upstream authorizes (``oauth.discovery``), makes sure Bastion is registered there
(pre-registered client, client ID metadata document, or dynamic registration), and writes a pending request to
``oauth_states``: the ``state`` only as a digest, single use, for ten minutes, bound to the browser that
started it, with the issuer recorded before the redirect. The database holds it, so the callback may land on
any replica.

``complete`` takes the callback's query, refuses anything stale, reused, foreign or from another server
(RFC 9207 ``iss``), and exchanges the code (PKCE verifier, ``resource``) for tokens. It does not store an
identity: the caller decides where the tokens go (an enrollment draft, or a needs_reauth identity's secret).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

import httpx2
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.identities import IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.models import AuthKind, OAuthClientSettings, OAuthRegistration, Server, Transport
from bastion.errors import ValidationFailed
from bastion.net.outbound import OutboundPolicy
from bastion.oauth import discovery, flow, pkce, registration, tokens
from bastion.oauth.errors import (
    AuthorizationDeclined,
    AuthorizationFailed,
    DiscoveryFailed,
    IssMismatch,
    IssuerMismatch,
    OAuthFlowError,
    PkceUnsupported,
    RegistrationFailed,
    ResourceMismatch,
    StateExpired,
    StateOtherBrowser,
    StateUnknown,
    StateUsed,
)
from bastion.oauth.metadata import AuthServerMetadata, issuers_match
from bastion.oauth.model import ClientAuth, OAuthError
from bastion.services import oauth_clients, servers
from bastion.settings import Settings
from bastion.types import JSONObject, JSONValue, MemberId, ServerId, WorkspaceId
from bastion.vault.sealer import Vault

__all__ = [
    "PURPOSE",
    "STATE_LIFETIME",
    "AuthorizationDeclined",
    "AuthorizationFailed",
    "Connected",
    "DiscoveryFailed",
    "IssMismatch",
    "IssuerMismatch",
    "OAuthFlowError",
    "PkceUnsupported",
    "RegistrationFailed",
    "ResourceMismatch",
    "StateExpired",
    "StateOtherBrowser",
    "StateUnknown",
    "StateUsed",
    "begin",
    "complete",
    "purge_states",
]

T = schema.oauth_states
PURPOSE: Final = "upstream"
STATE_LIFETIME: Final = timedelta(minutes=10)
# Expired states stay this long after expiry, so a late callback hears "expired", not "unknown".
STATE_KEPT_AFTER_EXPIRY: Final = timedelta(hours=1)
STATE_BYTES: Final = 32
HTTP_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Connected:
    """A completed authorization: tokens for one member at one server, not yet stored anywhere.

    ``details`` follows ``oauth.model``'s convention for an OAuth identity. The secret never prints.
    """

    context: JSONObject
    workspace_id: WorkspaceId
    member_id: MemberId
    server_id: ServerId
    details: JSONObject
    label: str
    secret: IdentitySecret = field(repr=False)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def _browser_tag(browser: str) -> str:
    """What ``oauth_states.browser`` keeps: a digest, so a session handle is never stored as is."""
    return hashlib.sha256(browser.encode("utf-8")).hexdigest()


def _public_url(settings: Settings) -> str:
    # BASTION_PUBLIC_URL, or the address Bastion listens on: a local Bastion's redirect URI works unconfigured.
    return settings.base_url


async def begin(
    store: Store,
    vault: Vault,
    settings: Settings,
    *,
    workspace_id: str,
    member_id: str,
    server_id: str,
    browser: str,
    context: JSONObject,
    scope: str | None = None,
) -> str:
    """Start connecting ``member_id``'s identity at ``server_id``; the authorization URL to send the browser to.

    Args:
        browser: an opaque handle of the browser session (the callback must come back with the same one).
        context: the caller's own data, handed back by ``complete``.
        scope: an explicit scope (a step-up); by default it is chosen from the server's challenge and metadata.

    Raises:
        ValidationFailed: the server does not use OAuth over HTTP.
        DiscoveryFailed, ResourceMismatch, IssuerMismatch, PkceUnsupported, RegistrationFailed: see their docs.
    """
    public_url = _public_url(settings)
    policy = OutboundPolicy.from_settings(settings)
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        server = await servers.find(conn, workspace_id, server_id)
        await _purge(conn, now)
    if server.auth_kind is not AuthKind.OAUTH or server.url is None or server.transport is Transport.STDIO:
        raise ValidationFailed(f"server {server.name!r} does not use OAuth over HTTP", field="server")
    options = server.oauth or OAuthClientSettings(OAuthRegistration.AUTO)
    async with policy.client(timeout=HTTP_TIMEOUT_S) as http:
        found = await discovery.discover(
            http, server.url, transport=server.transport, issuer_hint=options.authorization_server
        )
        meta = found.authorization_server
        if not meta.supports_s256:
            raise PkceUnsupported(
                f"the authorization server {meta.issuer} does not advertise PKCE with S256; connecting without it "
                "is not safe, so Bastion will not"
            )
        policy.check_url(meta.authorization_endpoint)  # a URL for the browser: http(s) only, like every other
        chosen = flow.select_scope(
            requested=scope,
            challenge=found.challenge,
            configured=options.scopes,
            resource_scopes=found.protected_resource.scopes_supported if found.protected_resource else None,
            server=meta,
        )
        client_row_id, client_id = await _registered(store, vault, http, server, options, meta, public_url, chosen)
    state = secrets.token_urlsafe(STATE_BYTES)
    verifier = pkce.new_verifier()
    redirect = registration.redirect_uri(public_url)
    flow_data: JSONObject = {
        # The client the authorization URL names: the code is exchanged as that client or not at all.
        "client_id": client_id,
        "token_endpoint": meta.token_endpoint,
        "revocation_endpoint": meta.revocation_endpoint,
        "iss_required": meta.iss_parameter_supported,
    }
    async with store.transaction() as conn:
        await conn.execute(
            T.insert().values(
                id=new_id(),
                workspace_id=workspace_id,
                digest=_digest(state),
                purpose=PURPOSE,
                browser=_browser_tag(browser),
                member_id=member_id,
                server_id=server.id,
                client_row_id=client_row_id,
                issuer=meta.issuer,
                redirect_uri=redirect,
                code_verifier=verifier,
                resource=found.resource,
                scope=chosen,
                context={"caller": context, "flow": flow_data},
                created_at=now,
                expires_at=now + STATE_LIFETIME,
                used_at=None,
            )
        )
    return flow.authorization_url(
        meta,
        client_id=client_id,
        redirect_uri=redirect,
        state=state,
        code_verifier=verifier,
        scope=chosen,
        resource=found.resource,
    )


async def _registered(
    store: Store,
    vault: Vault,
    http: httpx2.AsyncClient,
    server: Server,
    options: OAuthClientSettings,
    meta: AuthServerMetadata,
    public_url: str,
    scope: str | None,
) -> tuple[str, str]:
    """Bastion's client at ``meta``'s issuer for ``server``, registering first if needed: (row id, client id).

    Two members connecting at once may both register; the first to save wins and the other uses its
    registration (``oauth_clients.save``), so the authorization URL and the state name the client saved.
    """
    redirect = registration.redirect_uri(public_url)
    now = datetime.now(UTC)
    preregistered = options.registration is OAuthRegistration.PRE_REGISTERED or bool(options.client_id)
    # With no authorization server named, a pre-registered client is bound to the first issuer it is used at.
    pinned = options.authorization_server is None
    async with store.transaction() as conn:
        current = await oauth_clients.find(conn, vault, server.id, meta.issuer)
        secret = None
        if preregistered and options.client_id:
            secret = await oauth_clients.preregistered_secret(
                conn, vault, server.id, options.client_id, meta.issuer, pinned=pinned
            )
    chosen = await _choose(http, options, meta, public_url, scope, current, secret, now)

    def fits(row: oauth_clients.ClientRow) -> bool:
        return not preregistered and _reusable(row, options.registration, meta, public_url, now)

    async with store.transaction() as conn:
        saved = await oauth_clients.save(
            conn,
            vault,
            workspace_id=server.workspace_id,
            server_id=server.id,
            issuer=meta.issuer,
            registration=chosen,
            redirect_uri=redirect,
            details=oauth_clients.endpoints_of(meta),
            seen=current.id if current is not None else None,
            fits=fits,
            pinned=pinned,
        )
    return saved.id, saved.client_id


async def _choose(
    http: httpx2.AsyncClient,
    options: OAuthClientSettings,
    meta: AuthServerMetadata,
    public_url: str,
    scope: str | None,
    current: oauth_clients.ClientRow | None,
    secret: str | None,
    now: datetime,
) -> registration.Registration:
    """The MCP specification's order (``auto``), or the one way an admin chose.

    1. A client id an admin configured (and its secret, if given).
    2. The registration already stored for this issuer, while it still fits: identities' refresh tokens are
       bound to its client id, so a working registration is never swapped for another.
    3. Bastion's client ID metadata document, where the server supports it and Bastion's URL is https.
    4. Dynamic client registration.

    Raises:
        RegistrationFailed: none of the allowed ways works here; the message says what an admin can do.
    """
    mode = options.registration
    if mode is OAuthRegistration.PRE_REGISTERED or options.client_id:
        return _preregistered(options, meta, secret)
    if current is not None and _reusable(current, mode, meta, public_url, now):
        return registration.Registration(
            current.registration, current.client_id, current.auth_method, current.client_secret
        )
    if mode in (OAuthRegistration.AUTO, OAuthRegistration.CLIENT_METADATA_DOCUMENT):
        if registration.uses_metadata_document(meta, public_url):
            url = registration.client_metadata_url(public_url)
            return registration.Registration(OAuthRegistration.CLIENT_METADATA_DOCUMENT, url, ClientAuth.NONE)
        if mode is OAuthRegistration.CLIENT_METADATA_DOCUMENT:
            raise RegistrationFailed(
                f"this server is set to use Bastion's client ID metadata document, but {_no_document(meta, public_url)}"
                "; an admin can set its OAuth registration to auto"
            )
        if meta.registration_endpoint is None:
            raise RegistrationFailed(
                f"Bastion cannot become a client of {meta.issuer}: no client id is set for this server, "
                f"{_no_document(meta, public_url)}, and it offers no dynamic client registration. An admin must "
                f"register Bastion there (redirect URI {registration.redirect_uri(public_url)}) and enter the "
                "client id (and secret) in the server's OAuth settings"
            )
    return await registration.register_dynamic(http, meta, public_url=public_url, scope=scope)


def _no_document(meta: AuthServerMetadata, public_url: str) -> str:
    """Why a client ID metadata document cannot be used (it is not, when this is called)."""
    if not meta.client_id_metadata_document_supported:
        return "the authorization server does not accept client ID metadata documents"
    return f"Bastion's public URL {public_url} is not https, so the authorization server could not fetch its document"


def _preregistered(
    options: OAuthClientSettings, meta: AuthServerMetadata, secret: str | None
) -> registration.Registration:
    if not options.client_id:
        raise RegistrationFailed("this server is set to use a pre-registered OAuth client, but no client id is set")
    if options.authorization_server and not issuers_match(meta.issuer, options.authorization_server):
        raise RegistrationFailed(
            f"the pre-registered client is for {options.authorization_server}, but the server now uses "
            f"{meta.issuer}; an admin must register Bastion there"
        )
    method = registration.choose_auth_method(meta.token_endpoint_auth_methods_supported, has_secret=secret is not None)
    return registration.Registration(OAuthRegistration.PRE_REGISTERED, options.client_id, method, secret)


def _reusable(
    current: oauth_clients.ClientRow,
    mode: OAuthRegistration,
    meta: AuthServerMetadata,
    public_url: str,
    now: datetime,
) -> bool:
    """Whether a stored registration may be used as it is in the admin's chosen ``mode``."""
    return mode in (OAuthRegistration.AUTO, current.registration) and _still_good(current, meta, public_url, now)


def _still_good(current: oauth_clients.ClientRow, meta: AuthServerMetadata, public_url: str, now: datetime) -> bool:
    """Whether a stored CIMD or dynamic registration may be used again as it is."""
    if current.registration is OAuthRegistration.PRE_REGISTERED:
        return False
    if current.redirect_uri != registration.redirect_uri(public_url):
        return False
    if current.registration is OAuthRegistration.CLIENT_METADATA_DOCUMENT:
        return registration.uses_metadata_document(meta, public_url) and current.client_id == (
            registration.client_metadata_url(public_url)
        )
    expires = current.details.get("secret_expires_at")
    return not (isinstance(expires, str) and datetime.fromisoformat(expires) <= now)


async def complete(
    store: Store, vault: Vault, settings: Settings, *, browser: str, params: Mapping[str, str]
) -> Connected:
    """Finish an authorization from its callback's query parameters.

    The state is used up whatever happens next, so a callback is never replayed.

    Raises:
        StateUnknown, StateExpired, StateUsed, StateOtherBrowser: the ``state`` is not one to accept.
        IssMismatch: the answer is not from the authorization server the request went to (no code is sent
            anywhere then).
        AuthorizationDeclined: the person declined.
        AuthorizationFailed: the server's error, or the code could not be exchanged.
    """
    state = params.get("state")
    if not state:
        raise StateUnknown("this answer carries no state; start connecting again")
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        await _purge(conn, now)
        row = (await conn.execute(sa.select(T).where(T.c.digest == _digest(state), T.c.purpose == PURPOSE))).first()
        if row is None:
            raise StateUnknown("this sign-in attempt is unknown; start connecting again")
        if not hmac.compare_digest(row.browser, _browser_tag(browser)):
            raise StateOtherBrowser("this sign-in attempt was started in another browser; start again here")
        if row.used_at is not None:
            raise StateUsed("this sign-in attempt was already used; start connecting again")
        if row.expires_at <= now:
            raise StateExpired("this sign-in attempt took longer than 10 minutes; start connecting again")
        # Used up, and its verifier with it: a spent state keeps nothing that could finish a sign-in.
        used = await conn.execute(
            T.update()
            .where(T.c.id == row.id, T.c.used_at.is_(None), T.c.expires_at > now)
            .values(used_at=now, code_verifier=None)
        )
        verifier = row.code_verifier
        if used.rowcount != 1 or verifier is None:
            raise StateUsed("this sign-in attempt was already used; start connecting again")
        if row.client_row_id is None or row.member_id is None or row.server_id is None:
            raise StateUnknown("this sign-in attempt is not a connection to an upstream server")
        client = await oauth_clients.load(conn, vault, row.workspace_id, row.client_row_id)
        server = await servers.find(conn, row.workspace_id, row.server_id)
    stored = cast("dict[str, Any]", row.context)
    flow_data = cast("dict[str, Any]", stored.get("flow", {}))
    code = flow.code_from_callback(params, issuer=row.issuer, iss_required=bool(flow_data.get("iss_required")))
    if client.client_id != flow_data.get("client_id"):
        # The code was issued to the client the authorization URL named; another would be refused (or worse,
        # accepted as someone else). Not expected (registrations are never rewritten), but never risked.
        raise AuthorizationFailed(
            "Bastion's registration at the authorization server changed while you were signing in; "
            "start connecting again"
        )
    policy = OutboundPolicy.from_settings(settings)
    try:
        async with policy.client(timeout=HTTP_TIMEOUT_S) as http:
            got = await tokens.exchange_code(
                http,
                str(flow_data["token_endpoint"]),
                client.credentials,
                code=code,
                redirect_uri=row.redirect_uri,
                code_verifier=verifier,
                resource=row.resource,
            )
    except OAuthError as exc:
        raise AuthorizationFailed(f"the authorization server would not issue tokens: {exc}") from None
    details: JSONObject = {
        "issuer": row.issuer,
        "token_endpoint": str(flow_data["token_endpoint"]),
        "revocation_endpoint": cast("JSONValue", flow_data.get("revocation_endpoint")),
        "oauth_client": client.id,
        "resource": row.resource,
        "scope": got.scope or row.scope,
    }
    if got.expires_at is not None:
        details["expires_at"] = got.expires_at.isoformat()
    return Connected(
        context=cast("JSONObject", stored.get("caller", {})),
        workspace_id=WorkspaceId(row.workspace_id),
        member_id=MemberId(row.member_id),
        server_id=ServerId(row.server_id),
        details=details,
        label=f"{server.name} (OAuth)",
        secret=IdentitySecret(access_token=got.access_token, refresh_token=got.refresh_token),
    )


async def _purge(conn: AsyncConnection, now: datetime) -> int:
    """Delete upstream states that expired over ``STATE_KEPT_AFTER_EXPIRY`` ago; how many went."""
    result = await conn.execute(
        T.delete().where(T.c.purpose == PURPOSE, T.c.expires_at < now - STATE_KEPT_AFTER_EXPIRY)
    )
    return result.rowcount


async def purge_states(store: Store) -> int:
    """Delete long-expired upstream states (also done in passing by ``begin`` and ``complete``)."""
    async with store.transaction() as conn:
        return await _purge(conn, datetime.now(UTC))
