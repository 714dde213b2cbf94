"""Single sign-on with any OpenID Connect provider: discovery, code flow with PKCE, state and nonce, id_token checks.

The state lives in ``oauth_states`` (purpose ``sign_in``) bound to the browser that began, so the callback may land
on any replica; every fetch goes through the outbound policy.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import urlencode

import jwt
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import naming
from bastion.domain.actor import Actor
from bastion.domain.capabilities import MEMBER_ROLE, Capability
from bastion.domain.ids import new_id
from bastion.domain.models import Member, MemberStatus
from bastion.domain.specs import MemberSpec
from bastion.errors import BastionError, Conflict, Forbidden
from bastion.net.outbound import OutboundPolicy, UrlRefused, fetch
from bastion.oauth import pkce, tokens
from bastion.oauth.metadata import OIDC_WELL_KNOWN
from bastion.oauth.model import ClientAuth, ClientCredentials, OAuthError
from bastion.services import accounts, members
from bastion.services.actions import action
from bastion.services.apikeys import KeyHasher
from bastion.types import WorkspaceId

S = schema.oauth_states
B = schema.member_sso_identities
L = schema.connection_links

PURPOSE: Final = "sign_in"
STATE_LIFETIME: Final = timedelta(minutes=10)
METADATA_TTL_S: Final = 3600.0
JWKS_MIN_REFETCH_S: Final = 60.0
MAX_DOCUMENT_BYTES: Final = 256 * 1024
CLOCK_SKEW_S: Final = 60
SCOPE: Final = "openid email profile"
MAX_SUBJECT_CHARS: Final = 255  # OpenID Connect Core 1.0 §2: sub is at most 255 ASCII characters
# Asymmetric signatures only: "none" and shared-secret HMAC are never accepted.
ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class SsoFailed(BastionError):
    """The provider could not sign the person in (unreachable, refused, or answered something untrustworthy)."""

    code = "sso_failed"
    status = 502
    title = "Single sign-on failed"


class SsoAccountMismatch(Forbidden):
    """The provider's account (its subject) is not the one the member's Bastion account is bound to."""

    code = "sso_account_mismatch"
    title = "A different single sign-on account"


class SsoStateInvalid(BastionError):
    """The callback's state is unknown, used, expired or from another browser."""

    code = "sso_state_invalid"
    status = 400
    title = "Sign-in link expired"


@dataclass(frozen=True, slots=True)
class OidcConfig:
    issuer: str
    client_id: str
    display_name: str
    allowed_domains: frozenset[str]
    client_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: frozenset[str]
    auth_methods: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SignedOn:
    member: Member
    next_path: str


def _string(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise SsoFailed(f"the provider's discovery document has no {name}")
    return value


def _strings(doc: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = doc.get(name)
    if not isinstance(value, list):
        return None
    return tuple(v for v in cast("list[Any]", value) if isinstance(v, str))


class Sso:
    """One configured provider. Discovery and keys are cached; states are in the database."""

    def __init__(self, store: Store, hasher: KeyHasher, config: OidcConfig, policy: OutboundPolicy) -> None:
        self._store = store
        self._hasher = hasher
        self.config = config
        self._policy = policy
        self._metadata: tuple[float, ProviderMetadata] | None = None
        self._jwks: tuple[float, jwt.PyJWKSet] | None = None

    def __repr__(self) -> str:
        return f"Sso(issuer={self.config.issuer!r})"

    @property
    def display_name(self) -> str:
        return self.config.display_name

    async def _get_json(self, url: str, what: str) -> Mapping[str, Any]:
        try:
            async with self._policy.client(timeout=10.0) as http:
                response = await fetch(http, self._policy, "GET", url, headers={"Accept": "application/json"})
                body = response.content
        except UrlRefused as exc:
            raise SsoFailed(f"the provider's {what} address is refused: {exc.detail}") from None
        except OSError as exc:
            raise SsoFailed(f"the provider's {what} could not be fetched ({type(exc).__name__})") from None
        except Exception as exc:  # noqa: BLE001  any transport failure is the provider being unreachable
            raise SsoFailed(f"the provider's {what} could not be fetched ({type(exc).__name__})") from None
        if response.status_code != 200 or len(body) > MAX_DOCUMENT_BYTES:
            raise SsoFailed(f"the provider's {what} answered HTTP {response.status_code}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise SsoFailed(f"the provider's {what} is not JSON") from None
        if not isinstance(doc, dict):
            raise SsoFailed(f"the provider's {what} is not a JSON object")
        return cast("dict[str, Any]", doc)

    async def metadata(self) -> ProviderMetadata:
        """The provider's discovery document; its ``issuer`` must be exactly the configured one."""
        now = time.monotonic()
        if self._metadata is not None and now - self._metadata[0] < METADATA_TTL_S:
            return self._metadata[1]
        issuer = self.config.issuer
        doc = await self._get_json(issuer.rstrip("/") + OIDC_WELL_KNOWN, "discovery document")
        if doc.get("issuer") != issuer:
            raise SsoFailed("the provider's discovery document names another issuer; refusing to use it")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            self._policy.check_url(_string(doc, name))
        methods = _strings(doc, "code_challenge_methods_supported")
        if methods is not None and pkce.METHOD not in methods:
            raise SsoFailed("the provider does not support PKCE with S256")
        algorithms = frozenset(_strings(doc, "id_token_signing_alg_values_supported") or ("RS256",))
        found = ProviderMetadata(
            issuer=issuer,
            authorization_endpoint=_string(doc, "authorization_endpoint"),
            token_endpoint=_string(doc, "token_endpoint"),
            jwks_uri=_string(doc, "jwks_uri"),
            algorithms=algorithms & ALLOWED_ALGORITHMS,
            auth_methods=_strings(doc, "token_endpoint_auth_methods_supported") or ("client_secret_basic",),
        )
        self._metadata = (now, found)
        return found

    async def _key_for(self, meta: ProviderMetadata, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        for attempt in range(2):
            if self._jwks is None or (attempt == 1 and now - self._jwks[0] >= JWKS_MIN_REFETCH_S):
                doc = await self._get_json(meta.jwks_uri, "signing keys")
                try:
                    self._jwks = (now, jwt.PyJWKSet.from_dict(dict(doc)))
                except jwt.PyJWTError:
                    raise SsoFailed("the provider's signing keys could not be read") from None
            keys = [k for k in self._jwks[1].keys if kid is None or k.key_id == kid]
            if len(keys) == 1 or (keys and kid is not None):
                return keys[0]
            if attempt == 0 and self._jwks[0] == now:
                break  # just fetched: asking again will not help
        raise SsoFailed("the provider signed the sign-in with a key it does not publish")

    def _credentials(self, meta: ProviderMetadata) -> ClientCredentials:
        secret = self.config.client_secret
        if not secret:
            return ClientCredentials(self.config.client_id, ClientAuth.NONE)
        if "client_secret_basic" in meta.auth_methods:
            return ClientCredentials(self.config.client_id, ClientAuth.BASIC, secret)
        return ClientCredentials(self.config.client_id, ClientAuth.POST, secret)

    async def begin(self, workspace_id: WorkspaceId, *, browser: str, redirect_uri: str, next_path: str) -> str:
        """The provider's authorization URL for this browser; the state, nonce and verifier are stored first."""
        meta = await self.metadata()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = pkce.new_verifier()
        now = datetime.now(UTC)
        async with self._store.transaction() as conn:
            await conn.execute(S.delete().where(S.c.purpose == PURPOSE, S.c.expires_at <= now))
            await conn.execute(
                S.insert().values(
                    id=new_id(),
                    workspace_id=workspace_id,
                    digest=self._hasher.digest(state),
                    purpose=PURPOSE,
                    browser=browser,
                    member_id=None,
                    server_id=None,
                    client_row_id=None,
                    issuer=meta.issuer,
                    redirect_uri=redirect_uri,
                    code_verifier=verifier,
                    resource=None,
                    scope=SCOPE,
                    context={"next": next_path, "nonce": nonce},
                    created_at=now,
                    expires_at=now + STATE_LIFETIME,
                    used_at=None,
                )
            )
        query = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": SCOPE,
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce.challenge_of(verifier),
            "code_challenge_method": pkce.METHOD,
        }
        separator = "&" if "?" in meta.authorization_endpoint else "?"
        return meta.authorization_endpoint + separator + urlencode(query)

    async def _take_state(self, browser: str | None, state: str) -> sa.Row[Any]:
        """The state row, used up now: unknown, used, expired and other-browser states are all refused."""
        stale = "this sign-in took too long or was already used; sign in again"
        if not state or len(state) > 512:
            raise SsoStateInvalid(stale)
        digest = self._hasher.digest(state)
        now = datetime.now(UTC)
        async with self._store.transaction() as conn:
            row = (await conn.execute(sa.select(S).where(S.c.digest == digest, S.c.purpose == PURPOSE))).first()
            if row is None or row.used_at is not None or now >= row.expires_at:
                raise SsoStateInvalid(stale)
            if browser is None or not hmac.compare_digest(row.browser.encode(), browser.encode()):
                raise SsoStateInvalid("this sign-in was started in another browser; sign in again here")
            # Used up now, and its PKCE verifier with it: the row keeps no secret once the callback has it.
            taken = await conn.execute(
                S.update().where(S.c.id == row.id, S.c.used_at.is_(None)).values(used_at=now, code_verifier=None)
            )
            if taken.rowcount != 1:
                raise SsoStateInvalid(stale)
        return row

    async def complete(self, *, browser: str | None, params: Mapping[str, str]) -> SignedOn:
        """Check the callback, trade the code, validate the id_token and find (or make) the member."""
        row = await self._take_state(browser, params.get("state", ""))
        name = self.config.display_name
        if "error" in params:
            if params["error"] == "access_denied":
                raise Forbidden(f"You did not allow {name} to sign you in to Bastion.")
            raise SsoFailed(f"{name} could not sign you in ({params['error'][:64]})")
        meta = await self.metadata()
        if "iss" in params and params["iss"] != meta.issuer:
            raise SsoFailed(f"the answer did not come from {name}; sign in again")
        code = params.get("code", "")
        if not code:
            raise SsoFailed(f"{name} sent no authorization code")
        try:
            async with self._policy.client(timeout=10.0) as http:
                answer = await tokens.exchange_code(
                    http,
                    self._policy.check_url(meta.token_endpoint),
                    self._credentials(meta),
                    code=code,
                    redirect_uri=row.redirect_uri,
                    code_verifier=row.code_verifier,
                    resource=None,
                )
        except OAuthError as exc:
            raise SsoFailed(f"{name} refused the sign-in ({exc.error})") from None
        except UrlRefused as exc:
            raise SsoFailed(exc.detail) from None
        if answer.id_token is None:
            raise SsoFailed(f"{name} returned no id_token")
        claims = await self._validate(meta, answer.id_token, str(row.context.get("nonce", "")))
        member = await self._member_for(WorkspaceId(row.workspace_id), claims)
        return SignedOn(member, str(row.context.get("next", "/me")))

    async def _validate(self, meta: ProviderMetadata, id_token: str, nonce: str) -> Mapping[str, Any]:
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise SsoFailed("the id_token is not a JWT") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in meta.algorithms:
            raise SsoFailed("the id_token is signed with an algorithm Bastion does not accept")
        kid = header.get("kid")
        key = await self._key_for(meta, kid if isinstance(kid, str) else None)
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key.key,
                algorithms=[algorithm],
                audience=self.config.client_id,
                issuer=meta.issuer,
                leeway=CLOCK_SKEW_S,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise SsoFailed(f"the id_token is not valid ({type(exc).__name__})") from None
        audience = claims.get("aud")
        if (
            isinstance(audience, list)
            and len(cast("list[Any]", audience)) > 1
            and claims.get("azp") != self.config.client_id
        ):
            raise SsoFailed("the id_token was issued to another client")
        presented = claims.get("nonce")
        if not nonce or not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), nonce.encode()):
            raise SsoFailed("the id_token does not answer this sign-in (nonce mismatch)")
        return claims

    async def _member_for(self, workspace_id: WorkspaceId, claims: Mapping[str, Any]) -> Member:
        """The member with this verified email; a new one if the domain is allowed or the email was invited."""
        raw_email = claims.get("email")
        if not isinstance(raw_email, str) or claims.get("email_verified") is not True:
            raise Forbidden(
                f"{self.config.display_name} did not vouch for your email address, so Bastion cannot tell who you are."
            )
        email = naming.email(raw_email)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_CHARS:
            raise SsoFailed(f"{self.config.display_name} identified you with an unusable subject")
        async with self._store.transaction() as conn:
            found = await accounts.find_active_by_email(conn, workspace_id, email)
            invited = found is None and await _invited(conn, workspace_id, email)
            bound = (
                await conn.execute(
                    sa.select(B.c.member_id).where(B.c.issuer == self.config.issuer, B.c.subject == subject)
                )
            ).scalar_one_or_none()
        if bound is not None and (found is None or found.id != bound):
            # The provider's account signed someone else in before: a changed or reused email must not move it.
            raise SsoAccountMismatch(
                f"This {self.config.display_name} account signs in to another Bastion account, not {email}. "
                "Ask an administrator."
            )
        if found is not None:
            if found.status is not MemberStatus.ACTIVE:
                raise Forbidden("this account is disabled; ask an administrator")
            await self._bind(found, subject, email)
            return found
        domain = email.rpartition("@")[2]
        if domain not in self.config.allowed_domains and not invited:
            raise Forbidden(f"{email} is not a member of this Bastion. Ask an administrator to invite you.")
        actor = Actor(workspace_id, None, frozenset({Capability.MEMBERS_MANAGE}), f"sso:{self.config.issuer}")
        name = claims.get("name")
        display = name.strip()[:200] if isinstance(name, str) and name.strip() else email.split("@")[0]
        try:
            member = await members.create(self._store, actor, MemberSpec(email, display, MEMBER_ROLE))
        except Conflict:  # made by a parallel sign-in a moment ago
            async with self._store.transaction() as conn:
                again = await accounts.find_active_by_email(conn, workspace_id, email)
            if again is None:
                raise
            member = again
        await self._bind(member, subject, email)
        return member

    async def _bind(self, member: Member, subject: str, email: str) -> None:
        """Record the provider's account (issuer + subject) at the member's first SSO sign-in; refuse another after."""
        issuer = self.config.issuer
        mismatch = SsoAccountMismatch(
            f"{email} signs in to Bastion with a different {self.config.display_name} account. Sign in with that "
            "one, or ask an administrator to unlink it."
        )
        for _attempt in range(2):
            try:
                async with self._store.transaction() as conn:
                    held = (
                        await conn.execute(
                            sa.select(B.c.subject).where(B.c.member_id == member.id, B.c.issuer == issuer)
                        )
                    ).scalar_one_or_none()
                    if held is not None:
                        if not hmac.compare_digest(held.encode(), subject.encode()):
                            raise mismatch
                        return
                    await conn.execute(
                        B.insert().values(
                            id=new_id(),
                            workspace_id=member.workspace_id,
                            member_id=member.id,
                            issuer=issuer,
                            subject=subject,
                            created_at=datetime.now(UTC),
                        )
                    )
                    actor = Actor(member.workspace_id, member.id, frozenset(), member.email)
                    action(conn, actor, "member.sso_bound", f"member:{member.id}", {"issuer": issuer})
                return
            except IntegrityError:
                continue  # a parallel first sign-in bound it a moment ago (or the subject is taken): look again
        raise mismatch


async def _invited(conn: Any, workspace_id: str, email: str) -> bool:
    """True when a live connection link names this email among the people it is for."""
    now = datetime.now(UTC)
    found = await conn.execute(
        sa.select(L.c.allowed_emails).where(
            L.c.workspace_id == workspace_id, L.c.revoked_at.is_(None), L.c.expires_at > now
        )
    )
    return any(email in (allowed or []) for (allowed,) in found.all())


async def purge_states(store: Store) -> int:
    """Delete expired sign-in states (also done in passing by ``Sso.begin``); how many went."""
    async with store.transaction() as conn:
        result = await conn.execute(S.delete().where(S.c.purpose == PURPOSE, S.c.expires_at <= datetime.now(UTC)))
    return result.rowcount
