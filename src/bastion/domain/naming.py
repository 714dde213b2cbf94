"""Rules for names, slugs, emails and URLs that every edge applies the same way."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from bastion.errors import ValidationFailed

SLUG_MAX_CHARS: Final = 63
NAME_MAX_CHARS: Final = 200
EMAIL_MAX_CHARS: Final = 254
URL_MAX_CHARS: Final = 2048

_SLUG_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Server names become tool-name prefixes (`server__tool`), so they share the MCP tool-name alphabet minus `__`.
_SERVER_NAME_RE: Final = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_EMAIL_RE: Final = re.compile(
    r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_ALLOWED_URL_SCHEMES: Final = frozenset({"http", "https"})


def slug(value: str, *, field: str = "slug") -> str:
    """A lowercase DNS-label slug: letters, digits and inner hyphens, at most 63 characters."""
    if not _SLUG_RE.fullmatch(value):
        raise ValidationFailed(
            f"{field} must be 1-63 lowercase letters, digits or hyphens, not starting or ending with a hyphen",
            field=field,
        )
    return value


def server_name(value: str, *, field: str = "name") -> str:
    """A server name usable as a tool namespace: no double underscore, which separates namespace and tool."""
    if not _SERVER_NAME_RE.fullmatch(value) or "__" in value:
        raise ValidationFailed(
            f"{field} must be 1-63 letters, digits, '.', '-' or '_' (no '__'), "
            "starting and ending with a letter or digit",
            field=field,
        )
    return value


def display_name(value: str, *, field: str = "name") -> str:
    """A human label: trimmed, non-empty, bounded, no control characters."""
    cleaned = value.strip()
    if not cleaned or len(cleaned) > NAME_MAX_CHARS or any(ord(ch) < 32 for ch in cleaned):
        raise ValidationFailed(f"{field} must be 1-{NAME_MAX_CHARS} printable characters", field=field)
    return cleaned


def email(value: str, *, field: str = "email") -> str:
    """A normalised (lowercased) email address."""
    cleaned = value.strip().lower()
    if len(cleaned) > EMAIL_MAX_CHARS or not _EMAIL_RE.fullmatch(cleaned):
        raise ValidationFailed(f"{field} must be an email address like ada@example.com", field=field)
    return cleaned


def http_url(value: str, *, field: str = "url") -> str:
    """An absolute http(s) URL with a host and no credentials or fragment."""
    if len(value) > URL_MAX_CHARS or any(ord(ch) <= 32 for ch in value):
        raise ValidationFailed(
            f"{field} must be a URL of at most {URL_MAX_CHARS} characters without spaces", field=field
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValidationFailed(f"{field} is not a valid URL", field=field) from None
    if parts.scheme.lower() not in _ALLOWED_URL_SCHEMES:
        raise ValidationFailed(f"{field} must use http or https", field=field)
    if not parts.hostname:
        raise ValidationFailed(f"{field} must name a host", field=field)
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed(f"{field} must not carry credentials; add them as an identity", field=field)
    if parts.fragment:
        raise ValidationFailed(f"{field} must not have a #fragment", field=field)
    if port == 0:
        raise ValidationFailed(f"{field} has an invalid port", field=field)
    return value
