"""How Bastion becomes known to an authorization server, in the MCP specification's order.

1. A pre-registered client (the admin's client id, and secret if any).
2. A client ID metadata document: when the server advertises ``client_id_metadata_document_supported``,
   Bastion's client id is the https URL of a document it serves itself (``/oauth/client-metadata.json``).
3. Dynamic client registration (RFC 7591) at the server's ``registration_endpoint``.

The token endpoint authentication method follows what the server supports
(``token_endpoint_auth_methods_supported``, RFC 8414's default being ``client_secret_basic``) and what the
registration answer says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import httpx2

from bastion.domain.models import OAuthRegistration
from bastion.oauth.discovery import read_bounded
from bastion.oauth.errors import RegistrationFailed
from bastion.oauth.metadata import AuthServerMetadata
from bastion.oauth.model import ClientAuth
from bastion.types import JSONObject, json_object

__all__ = [
    "CALLBACK_PATH",
    "CLIENT_METADATA_PATH",
    "CLIENT_NAME",
    "Registration",
    "choose_auth_method",
    "client_metadata",
    "client_metadata_url",
    "redirect_uri",
    "register_dynamic",
    "uses_metadata_document",
]

CLIENT_NAME: Final = "Bastion MCP gateway"
CALLBACK_PATH: Final = "/oauth/callback"
CLIENT_METADATA_PATH: Final = "/oauth/client-metadata.json"
GRANT_TYPES: Final = ("authorization_code", "refresh_token")
MAX_REGISTRATION_BYTES: Final = 64 * 1024
# RFC 8414 §2: when a server lists no methods, client_secret_basic is what it supports.
_DEFAULT_METHODS: Final = (ClientAuth.BASIC.value,)
_CONFIDENTIAL_ORDER: Final = (ClientAuth.BASIC, ClientAuth.POST)


@dataclass(frozen=True, slots=True)
class Registration:
    """Bastion's client at one authorization server. The secret never prints."""

    kind: OAuthRegistration
    client_id: str
    auth_method: ClientAuth
    client_secret: str | None = field(default=None, repr=False)
    secret_expires_at: datetime | None = None


def _base(public_url: str) -> str:
    return public_url.rstrip("/")


def redirect_uri(public_url: str) -> str:
    return _base(public_url) + CALLBACK_PATH


def client_metadata_url(public_url: str) -> str:
    return _base(public_url) + CLIENT_METADATA_PATH


def _application_type(public_url: str) -> str:
    """``web`` for a server reached over https; ``native`` for a loopback development install (SEP-837)."""
    return "web" if urlsplit(public_url).scheme == "https" else "native"


def client_metadata(public_url: str, *, auth_method: ClientAuth = ClientAuth.NONE) -> JSONObject:
    """Bastion's client metadata (RFC 7591 §2): the body of a registration, and the CIMD document."""
    return {
        "client_name": CLIENT_NAME,
        "client_uri": _base(public_url),
        "redirect_uris": [redirect_uri(public_url)],
        "grant_types": list(GRANT_TYPES),
        "response_types": ["code"],
        "token_endpoint_auth_method": auth_method.value,
        "application_type": _application_type(public_url),
    }


def uses_metadata_document(server: AuthServerMetadata, public_url: str) -> bool:
    """A client ID metadata document works when the server says so and Bastion's URL is https (an AS must
    fetch it; the draft requires https and a path)."""
    return server.client_id_metadata_document_supported and urlsplit(public_url).scheme == "https"


def choose_auth_method(supported: Sequence[str] | None, *, has_secret: bool) -> ClientAuth:
    """How to authenticate at the token endpoint: a secret goes the first way the server supports
    (basic, then post); without a secret, ``none``.

    Raises:
        RegistrationFailed: a secret, but the server supports neither way of sending one.
    """
    if not has_secret:
        return ClientAuth.NONE
    offered = tuple(supported) if supported is not None else _DEFAULT_METHODS
    for method in _CONFIDENTIAL_ORDER:
        if method.value in offered:
            return method
    raise RegistrationFailed(
        "the authorization server accepts no client secret at its token endpoint (it supports "
        f"{', '.join(offered) or 'nothing'}); Bastion can use client_secret_basic, client_secret_post or none"
    )


def _requested_method(supported: Sequence[str] | None) -> ClientAuth:
    """What to ask for at registration: a confidential method if the server has one, else a public client."""
    offered = tuple(supported) if supported is not None else _DEFAULT_METHODS
    for method in (*_CONFIDENTIAL_ORDER, ClientAuth.NONE):
        if method.value in offered:
            return method
    raise RegistrationFailed(
        f"the authorization server supports no token endpoint authentication Bastion has ({', '.join(offered)})"
    )


async def register_dynamic(
    http: httpx2.AsyncClient, server: AuthServerMetadata, *, public_url: str, scope: str | None = None
) -> Registration:
    """Register at the server's ``registration_endpoint`` (RFC 7591 §3).

    ``scope`` goes in the registration; a server that refuses it (``invalid_client_metadata``: RFC 7591 lets a
    server reject a scope it does not know at registration) is asked once more without it, as the scope is
    asked for again at the authorization endpoint anyway.

    Raises:
        RegistrationFailed: no endpoint, the server refused, or its answer is not a registration.
    """
    if server.registration_endpoint is None:
        raise RegistrationFailed(
            "the authorization server offers no dynamic client registration; ask an admin to register Bastion "
            "there and enter the client id (and secret) in the server's OAuth settings"
        )
    asked = _requested_method(server.token_endpoint_auth_methods_supported)
    body = client_metadata(public_url, auth_method=asked)
    if scope:
        body["scope"] = scope
    status, doc = await _post(http, server.registration_endpoint, body)
    if status == 400 and scope and _error_of(doc) == INVALID_CLIENT_METADATA:
        del body["scope"]
        status, doc = await _post(http, server.registration_endpoint, body)
    if status not in (200, 201):
        error = _error_of(doc)
        said = f" ({error})" if error is not None else ""
        raise RegistrationFailed(f"the authorization server refused to register Bastion: HTTP {status}{said}")
    if doc is None:
        raise RegistrationFailed("the registration answer is not a JSON object")
    return _registration(doc, asked)


INVALID_CLIENT_METADATA: Final = "invalid_client_metadata"


async def _post(http: httpx2.AsyncClient, endpoint: str, body: JSONObject) -> tuple[int, dict[str, Any] | None]:
    """One registration request: the answer's status and JSON object (None when it is not one)."""
    try:
        async with http.stream("POST", endpoint, json=body, headers=_JSON) as response:
            status = response.status_code
            raw = await read_bounded(response, MAX_REGISTRATION_BYTES)
    except httpx2.HTTPError as exc:
        raise RegistrationFailed(f"the registration endpoint could not be reached ({type(exc).__name__})") from None
    return status, _json_object(raw)


def _error_of(doc: dict[str, Any] | None) -> str | None:
    """The ``error`` code of a refusal, if it is one fit to repeat in a message."""
    error = doc.get("error") if doc is not None else None
    return error if isinstance(error, str) and error.isprintable() and len(error) <= 64 else None


_JSON: Final = {"Accept": "application/json"}


def _registration(doc: dict[str, Any], asked: ClientAuth) -> Registration:
    client_id = doc.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise RegistrationFailed("the registration answer has no client_id")
    secret = doc.get("client_secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise RegistrationFailed("the registration answer's client_secret is not a string")
    said = doc.get("token_endpoint_auth_method")
    method: ClientAuth
    if isinstance(said, str) and said in {m.value for m in ClientAuth}:
        method = ClientAuth(said)
    elif said is None:
        method = asked  # RFC 7591 §3.2.1: the server answers with what it registered; silence means as asked
    else:
        raise RegistrationFailed(f"the server registered Bastion for token endpoint authentication {said!r}")
    if method is not ClientAuth.NONE and secret is None:
        raise RegistrationFailed(f"the server registered Bastion for {method.value} but gave no client secret")
    expires = doc.get("client_secret_expires_at")
    expires_at = None
    if isinstance(expires, int) and not isinstance(expires, bool) and expires > 0:
        expires_at = datetime.fromtimestamp(min(expires, 253_402_300_799), UTC)
    return Registration(
        OAuthRegistration.DYNAMIC,
        client_id,
        method,
        secret if method is not ClientAuth.NONE else None,
        expires_at,
    )


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    return json_object(raw) if raw is not None else None
