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

# The patterns are also the API document's (web/api/schemas.py), so what it promises is what is accepted. They
# spell white space out, as what str.strip() removes, because `\s` means other characters in a JSON Schema (ECMA).
SPACES: Final = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A character of a name that is neither a control character nor white space.
_VISIBLE: Final = rf"[^\x00-\x1f{SPACES}]"
SLUG_PATTERN: Final = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
# Server names become tool-name prefixes (`server__tool`), so they share the MCP tool-name alphabet minus `__`.
SERVER_NAME_PATTERN: Final = r"^(?!.*__)[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_PATTERN: Final = rf"^[^@\x00-\x1f\x7f{SPACES}]{{1,64}}@{_LABEL}(?:\.{_LABEL})+$"
# Printable, with something besides white space (a name is trimmed).
DISPLAY_NAME_PATTERN: Final = rf"^[^\x00-\x1f]*{_VISIBLE}[^\x00-\x1f]*$"
# Text that is trimmed and then must be printable and not empty.
TRIMMED_TEXT_PATTERN: Final = rf"^[{SPACES}]*[^\x00-\x1f]*{_VISIBLE}[^\x00-\x1f]*[{SPACES}]*$"
BLANK_PATTERN: Final = rf"^[{SPACES}]*$"
# An https URL naming a host by name (labels starting with a letter, so never an address), an optional port and
# a path of URL characters: the form every outbound policy accepts at registration.
HTTPS_URL_PATTERN: Final = (
    r"^https://[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"(?::[1-9][0-9]{0,3})?(?:/[A-Za-z0-9._~!$&'()*+,;=:@/?-]*)?$"
)
_SLUG_RE: Final = re.compile(SLUG_PATTERN)
_SERVER_NAME_RE: Final = re.compile(SERVER_NAME_PATTERN)
_EMAIL_RE: Final = re.compile(EMAIL_PATTERN)
_DISPLAY_NAME_RE: Final = re.compile(DISPLAY_NAME_PATTERN)
_ALLOWED_URL_SCHEMES: Final = frozenset({"http", "https"})


def any_case(text: str) -> str:
    """A regular expression for ``text`` in any letter case, as a JSON Schema pattern can say it (no flags)."""
    return "".join(f"[{ch.upper()}{ch.lower()}]" if ch.isalpha() else re.escape(ch) for ch in text)


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
    if not _SERVER_NAME_RE.fullmatch(value):
        raise ValidationFailed(
            f"{field} must be 1-63 letters, digits, '.', '-' or '_' (no '__'), "
            "starting and ending with a letter or digit",
            field=field,
        )
    return value


def display_name(value: str, *, field: str = "name") -> str:
    """A human label: trimmed, non-empty, bounded, no control characters."""
    cleaned = value.strip()
    if len(cleaned) > NAME_MAX_CHARS or not _DISPLAY_NAME_RE.fullmatch(value):
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
