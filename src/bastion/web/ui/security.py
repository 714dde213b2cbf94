"""What every page response carries and every form must bring back: security headers, CSRF, safe redirects."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from starlette.responses import Response

# No inline script or style anywhere: the pages load /static files only, and nobody may frame them.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "x-csrf-token"
MAX_NEXT_CHARS: Final = 2048


def secure(response: Response, *, cache: str = "no-store") -> Response:
    """Add the security headers; pages are personal and some show secrets, so nothing is cached by default."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    response.headers["Cache-Control"] = cache
    return response


def safe_next(value: str | None, default: str = "/me") -> str:
    """``value`` if it is a path on this site (``/enroll/…``), else ``default``: never a way off-site.

    Refused: absolute and scheme-relative URLs (``//evil``), backslashes (browsers read ``/\\evil`` as
    ``//evil``), and any whitespace or control character (browsers drop tabs and newlines from URLs).
    """
    if not value or len(value) > MAX_NEXT_CHARS or not value.startswith("/"):
        return default
    if value.startswith("//") or "\\" in value:
        return default
    if any(ord(ch) <= 0x20 or 0x7F <= ord(ch) <= 0x9F or ch.isspace() for ch in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value
