"""What the OAuth client parts share: client credentials, token sets and authorization-server errors.

An OAuth identity (``IdentityKind.OAUTH``) keeps ``access_token`` and ``refresh_token`` sealed in its
``IdentitySecret``; its non-secret ``details`` say where they came from and how to renew them:

``issuer``, ``token_endpoint``, ``revocation_endpoint`` (optional), ``oauth_client`` (an ``oauth_clients``
row id), ``resource``, ``scope`` and ``expires_at`` (ISO 8601, UTC; absent when the server gave no lifetime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

DETAIL_KEYS: Final = (
    "issuer",
    "token_endpoint",
    "revocation_endpoint",
    "oauth_client",
    "resource",
    "scope",
    "expires_at",
)


class ClientAuth(StrEnum):
    """How Bastion authenticates at a token endpoint (RFC 8414 ``token_endpoint_auth_methods_supported``)."""

    BASIC = "client_secret_basic"
    POST = "client_secret_post"
    NONE = "none"


class OAuthError(Exception):
    """An authorization server's error response (RFC 6749 §5.2), or a response that is not one at all.

    ``error`` is the server's code (``invalid_grant``, ``invalid_client``…) or ``invalid_response``; the
    description is the server's own words, shortened, and never contains a token.
    """

    def __init__(self, error: str, description: str | None = None, *, status: int | None = None) -> None:
        self.error = error
        self.description = description
        self.status = status
        super().__init__(f"{error}: {description}" if description else error)


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """Bastion's registration at one authorization server. The secret never prints."""

    client_id: str
    auth_method: ClientAuth
    client_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """A token endpoint's answer. Tokens never print."""

    access_token: str = field(repr=False)
    token_type: str = "Bearer"  # noqa: S105  a token type, not a secret
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: datetime | None = None
    scope: str | None = None
    id_token: str | None = field(default=None, repr=False)  # OpenID Connect sign-in only; validated by its caller
