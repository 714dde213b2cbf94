"""The authorization code flow's decisions, without I/O: which scope, which URL, whether a callback is good.

- Scope (MCP spec, scope selection): the challenge's ``scope``, else the admin's configured scopes, else the
  protected resource's ``scopes_supported``, else none; ``offline_access`` is added only when the
  authorization server lists it (SEP-2207), and only to a scope that is requested at all.
- Step-up (403 ``insufficient_scope``): ask for the union of what was granted and what is challenged, and
  nothing when that asks for nothing new (no loop of re-authorizations).
- The authorization response: RFC 9207 ``iss`` compared as a plain string with the issuer recorded before
  the redirect (required when the server advertises it, checked whenever present), then the server's error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import urlencode, urlsplit, urlunsplit

from bastion.oauth import pkce
from bastion.oauth.challenge import Challenge
from bastion.oauth.errors import AuthorizationDeclined, AuthorizationFailed, IssMismatch
from bastion.oauth.metadata import AuthServerMetadata

__all__ = [
    "OFFLINE_ACCESS",
    "authorization_url",
    "code_from_callback",
    "select_scope",
    "step_up_scope",
    "union_scopes",
]

OFFLINE_ACCESS: Final = "offline_access"
MAX_ERROR_TEXT_CHARS: Final = 200


def union_scopes(first: str | None, second: str | None) -> str | None:
    """Both space-separated scope lists in one, ``first``'s order first, without repeats."""
    merged = list(dict.fromkeys([*(first or "").split(), *(second or "").split()]))
    return " ".join(merged) or None


def select_scope(
    *,
    requested: str | None,
    challenge: Challenge | None,
    configured: Sequence[str],
    resource_scopes: Sequence[str] | None,
    server: AuthServerMetadata,
) -> str | None:
    """The ``scope`` of an authorization request (None: the parameter is left out).

    Args:
        requested: an explicit scope (a step-up's), used as it is.
        configured: the admin's scopes for this server.
        resource_scopes: the protected resource metadata's ``scopes_supported``.
    """
    chosen = requested or (challenge.scope if challenge is not None else None)
    if chosen is None and configured:
        chosen = " ".join(configured)
    if chosen is None and resource_scopes:
        chosen = " ".join(resource_scopes)
    if chosen is not None and OFFLINE_ACCESS in (server.scopes_supported or ()):
        chosen = union_scopes(chosen, OFFLINE_ACCESS)
    return chosen or None


def step_up_scope(challenge: Challenge | None, granted: str | None) -> str | None:
    """The scope to re-authorize with after a 403, or None when re-authorizing cannot help.

    None when the answer is not an ``insufficient_scope`` challenge, names no scope, or names only scopes
    already granted: asking again would loop.
    """
    if challenge is None or challenge.error != "insufficient_scope" or challenge.scope is None:
        return None
    wanted = union_scopes(granted, challenge.scope)
    if wanted is None or set(wanted.split()) <= set((granted or "").split()):
        return None
    return wanted


def authorization_url(
    server: AuthServerMetadata,
    *,
    client_id: str,
    redirect_uri: str,
    state: str,
    code_verifier: str,
    scope: str | None,
    resource: str,
) -> str:
    """The authorization request (RFC 6749 §4.1.1) with PKCE S256 and ``resource``, as a URL for the browser."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": pkce.challenge_of(code_verifier),
        "code_challenge_method": pkce.METHOD,
        "resource": resource,
    }
    if scope:
        params["scope"] = scope
    parts = urlsplit(server.authorization_endpoint)
    # The endpoint may carry its own query (RFC 6749 §3.1 keeps it); ours is appended to it.
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def code_from_callback(params: Mapping[str, str], *, issuer: str, iss_required: bool) -> str:
    """The authorization code of a callback, after the RFC 9207 check.

    Raises:
        IssMismatch: ``iss`` absent although the server advertises it, or not exactly the recorded issuer.
        AuthorizationDeclined: the person declined (``access_denied``).
        AuthorizationFailed: any other error, or no code.
    """
    iss = params.get("iss")
    if iss is None and iss_required:
        raise IssMismatch(
            "the authorization server promises to say who it is in its answer, and this answer does not; "
            "it may not come from that server, so it was not used"
        )
    if iss is not None and iss != issuer:
        raise IssMismatch("this answer comes from another authorization server than the one asked; it was not used")
    error = params.get("error")
    if error is not None:
        if error == "access_denied":
            raise AuthorizationDeclined("you declined the connection at the authorization server")
        described = _printable(params.get("error_description"))
        raise AuthorizationFailed(
            f"the authorization server refused: {_printable(error)}" + (f" ({described})" if described else "")
        )
    code = params.get("code")
    if not code:
        raise AuthorizationFailed("the authorization server's answer carries no authorization code")
    return code


def _printable(text: str | None) -> str:
    if not text:
        return ""
    clean = "".join(c if c.isprintable() else " " for c in text).strip()
    return clean[:MAX_ERROR_TEXT_CHARS]
