"""Token endpoint calls (RFC 6749 §4.1.3, §6), with ``resource`` (RFC 8707), and token revocation (RFC 7009).

Every call authenticates the client as it registered (``client_secret_basic``, ``client_secret_post`` or
``none``), reads at most ``MAX_RESPONSE_BYTES`` of the answer, and parses it strictly. Failures are
``OAuthError``: the server's own error code, ``invalid_response`` for an answer that is not a token
response, or ``unreachable`` when no answer came. No token, code, verifier or secret ever appears in an
error: the server's description is scrubbed of what was sent.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import quote_plus

import httpx2

from bastion.oauth.model import ClientAuth, ClientCredentials, OAuthError, TokenSet

__all__ = ["INVALID_RESPONSE", "MAX_RESPONSE_BYTES", "UNREACHABLE", "exchange_code", "refresh", "revoke"]

MAX_RESPONSE_BYTES: Final = 64 * 1024
MAX_DESCRIPTION_CHARS: Final = 200
MAX_ERROR_CODE_CHARS: Final = 64
# A lifetime beyond ten years is a server bug, not a promise: it would overflow or never refresh.
MAX_EXPIRES_IN_S: Final = 10 * 365 * 24 * 3600
INVALID_RESPONSE: Final = "invalid_response"
UNREACHABLE: Final = "unreachable"
# RFC 6749 §5.2: error codes are %x20-21 / %x23-5B / %x5D-7E.
_ERROR_CODE: Final = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")
_DIGITS: Final = re.compile(r"[0-9]{1,12}")


async def exchange_code(
    http: httpx2.AsyncClient,
    token_endpoint: str,
    client: ClientCredentials,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    resource: str | None,
) -> TokenSet:
    """Trade an authorization code (with its PKCE verifier) for tokens.

    Raises:
        OAuthError: the server refused (``invalid_grant``…), answered something else, or could not be reached.
    """
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    form["code_verifier"] = code_verifier
    if resource is not None:
        form["resource"] = resource
    return _token_set(await _post(http, token_endpoint, client, form, secrets=(code, code_verifier)))


async def refresh(
    http: httpx2.AsyncClient,
    token_endpoint: str,
    client: ClientCredentials,
    *,
    refresh_token: str,
    resource: str | None,
    scope: str | None = None,
) -> TokenSet:
    """Trade a refresh token for fresh tokens; the answer may carry a rotated refresh token.

    Raises:
        OAuthError: ``invalid_grant`` when the refresh token is no longer good, or any other failure.
    """
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if resource is not None:
        form["resource"] = resource
    if scope is not None:
        form["scope"] = scope
    return _token_set(await _post(http, token_endpoint, client, form, secrets=(refresh_token,)))


async def revoke(
    http: httpx2.AsyncClient, revocation_endpoint: str, client: ClientCredentials, *, token: str, hint: str
) -> None:
    """Ask the server to revoke ``token`` (RFC 7009); ``hint`` is ``refresh_token`` or ``access_token``.

    Raises:
        OAuthError: any answer but 200 (RFC 7009 §2.2: an unknown token is still a 200).
    """
    form = {"token": token, "token_type_hint": hint}
    await _post(http, revocation_endpoint, client, form, secrets=(token,), want_body=False)


# --- the request ----------------------------------------------------------------------------------------------------


def _authenticate(client: ClientCredentials, form: dict[str, str]) -> dict[str, str]:
    """Add the client's authentication to ``form``; the headers it needs are returned."""
    secret = client.client_secret
    if client.auth_method is ClientAuth.BASIC:
        if secret is None:
            raise OAuthError("invalid_client", "client_secret_basic needs a client secret")
        # RFC 6749 §2.3.1: both parts are form-urlencoded before they are joined and base64-encoded.
        pair = f"{quote_plus(client.client_id, safe='')}:{quote_plus(secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}
    form["client_id"] = client.client_id
    if client.auth_method is ClientAuth.POST:
        if secret is None:
            raise OAuthError("invalid_client", "client_secret_post needs a client secret")
        form["client_secret"] = secret
    return {}


async def _post(
    http: httpx2.AsyncClient,
    url: str,
    client: ClientCredentials,
    form: dict[str, str],
    *,
    secrets: tuple[str, ...],
    want_body: bool = True,
) -> tuple[Any, datetime]:
    """POST ``form`` with client authentication; the parsed JSON body of a 200 (None if unwanted) and when it left.

    Any other answer is raised as the server's error.
    """
    headers = {"Accept": "application/json", **_authenticate(client, form)}
    hidden = tuple(s for s in (*secrets, client.client_secret) if s)
    sent = datetime.now(UTC)
    try:
        async with http.stream("POST", url, data=form, headers=headers) as response:
            status = response.status_code
            body = await _read_bounded(response, status)
    except httpx2.HTTPError as exc:
        raise OAuthError(UNREACHABLE, f"the authorization server could not be reached ({type(exc).__name__})") from None
    if status != 200:
        raise _error(body, status, hidden)
    return (_json(body) if want_body else None), sent


async def _read_bounded(response: httpx2.Response, status: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise OAuthError(INVALID_RESPONSE, f"the answer is larger than {MAX_RESPONSE_BYTES} bytes", status=status)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise OAuthError(INVALID_RESPONSE, f"the answer is larger than {MAX_RESPONSE_BYTES} bytes", status=status)
        chunks.append(chunk)
    return b"".join(chunks)


# --- the answer -----------------------------------------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8, bad JSON, huge integers
        raise OAuthError(INVALID_RESPONSE, "the token endpoint answered 200 without a JSON body", status=200) from None


def _error(body: bytes, status: int, hidden: tuple[str, ...]) -> OAuthError:
    """The server's error (RFC 6749 §5.2) if it sent one, else ``invalid_response`` naming the status."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8, bad JSON, huge integers
        doc = None
    if isinstance(doc, dict):
        fields = cast("dict[str, Any]", doc)
        code = fields.get("error")
        if isinstance(code, str) and code and len(code) <= MAX_ERROR_CODE_CHARS and _ERROR_CODE.fullmatch(code):
            description = fields.get("error_description")
            text = _scrub(description, hidden) if isinstance(description, str) else None
            return OAuthError(_scrub(code, hidden) or INVALID_RESPONSE, text, status=status)
    return OAuthError(INVALID_RESPONSE, f"HTTP {status} without an OAuth error", status=status)


def _scrub(text: str, hidden: tuple[str, ...]) -> str | None:
    """The server's words, shortened, printable, and without anything we sent it that is secret."""
    for secret in hidden:
        text = text.replace(secret, "[redacted]")
    clean = "".join(c if c.isprintable() else " " for c in text).strip()
    if len(clean) > MAX_DESCRIPTION_CHARS:  # shortened after scrubbing, so no half secret survives
        clean = clean[: MAX_DESCRIPTION_CHARS - 1] + "…"
    return clean or None


def _token_set(answer: tuple[Any, datetime]) -> TokenSet:
    """A strict reading of a successful token response (RFC 6749 §5.1)."""
    doc, sent = answer
    status = 200
    if not isinstance(doc, dict):
        raise OAuthError(INVALID_RESPONSE, "the token response is not a JSON object", status=status)
    fields = cast("Mapping[str, Any]", doc)
    access_token = fields.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise OAuthError(INVALID_RESPONSE, "the token response has no access_token", status=status)
    token_type = fields.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise OAuthError(INVALID_RESPONSE, "the token response's token_type is not Bearer", status=status)
    refresh_token = fields.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
        raise OAuthError(INVALID_RESPONSE, "the token response's refresh_token is not a string", status=status)
    scope = fields.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise OAuthError(INVALID_RESPONSE, "the token response's scope is not a string", status=status)
    id_token = fields.get("id_token")
    if id_token is not None and (not isinstance(id_token, str) or not id_token):
        raise OAuthError(INVALID_RESPONSE, "the token response's id_token is not a string", status=status)
    expires_at = None
    expires_in = _expires_in(fields.get("expires_in"), status)
    if expires_in is not None:
        # Counted from when the request left: the token may not outlive what the server meant.
        expires_at = sent + timedelta(seconds=expires_in)
    return TokenSet(
        access_token=access_token,
        token_type="Bearer",  # noqa: S106  a token type, not a secret
        refresh_token=refresh_token,
        expires_at=expires_at,
        scope=scope or None,
        id_token=id_token,
    )


def _expires_in(value: object, status: int) -> int | None:
    if value is None:
        return None
    seconds: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        seconds = int(value)  # seen in the wild; still a whole number of seconds
    if seconds is None or not 0 <= seconds <= MAX_EXPIRES_IN_S:
        raise OAuthError(INVALID_RESPONSE, "the token response's expires_in is not a number of seconds", status=status)
    return seconds
