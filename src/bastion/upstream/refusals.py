"""Noticing that an upstream refused a credential (HTTP 401), for the call it refused.

The MCP client turns an HTTP 401 into a generic JSON-RPC error, so the HTTP client reports it here
instead: a call sets ``watching()`` around its upstream request and learns afterwards whether the
upstream answered 401, and to which access token. The SDK sends each request in the context of the
call that waits on it, so concurrent calls on one shared session each see only their own refusals.
A token is named by its ``generation`` (a digest), never by its value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import httpx2

UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404


def generation(access_token: str) -> str:
    """A stable name for one access token: which credential a session carries, without carrying it."""
    return hashlib.sha256(access_token.encode("utf-8")).hexdigest()[:32]


@dataclass(slots=True)
class Refusal:
    """Set when an upstream answers 401; ``generation`` names the bearer token it refused (None: not a bearer)."""

    seen: bool = False
    generation: str | None = None
    # The WWW-Authenticate values of a 403 answer (an ``insufficient_scope`` challenge asks for a step-up).
    forbidden: tuple[str, ...] | None = None
    # A 404 to a request in a session: the upstream no longer knows the session (restarted, expired, ended).
    session_lost: bool = False


_current: ContextVar[Refusal | None] = ContextVar("bastion_upstream_refusal", default=None)


@contextmanager
def watching() -> Generator[Refusal]:
    """Record 401 answers to the upstream requests made in this context (and tasks it starts) until exit."""
    refusal = Refusal()
    token = _current.set(refusal)
    try:
        yield refusal
    finally:
        _current.reset(token)


def watch() -> Refusal:
    """Like ``watching()`` for the rest of the current task (a task that owns a session for its lifetime)."""
    refusal = Refusal()
    _current.set(refusal)
    return refusal


def session_lost() -> bool:
    """Whether an upstream request in this context was answered 404 for its session since last asked."""
    refusal = _current.get()
    if refusal is None or not refusal.session_lost:
        return False
    refusal.session_lost = False
    return True


async def note(response: httpx2.Response) -> None:
    """An httpx2 response hook: report a 401, a 403 or a lost session to whoever is watching in this context."""
    if response.status_code not in (UNAUTHORIZED, FORBIDDEN, NOT_FOUND):
        return
    refusal = _current.get()
    if refusal is None:
        return
    if response.status_code == NOT_FOUND:
        refusal.session_lost = refusal.session_lost or "mcp-session-id" in response.request.headers
        return
    if response.status_code == FORBIDDEN:
        refusal.forbidden = tuple(response.headers.get_list("www-authenticate"))
        return
    refusal.seen = True
    scheme, _, credentials = response.request.headers.get("authorization", "").partition(" ")
    refusal.generation = generation(credentials.strip()) if scheme.lower() == "bearer" and credentials else None
