"""PKCE (RFC 7636) with S256 only: a fresh verifier per authorization request and its challenge."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Final

__all__ = ["METHOD", "VERIFIER_BYTES", "challenge_of", "new_verifier"]

METHOD: Final = "S256"
# 32 random bytes -> 43 base64url characters: the RFC's minimum length, 256 bits of entropy.
VERIFIER_BYTES: Final = 32


def new_verifier() -> str:
    """A code verifier from the CSPRNG (43 characters of the unreserved alphabet)."""
    return secrets.token_urlsafe(VERIFIER_BYTES)


def challenge_of(verifier: str) -> str:
    """``BASE64URL(SHA256(verifier))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
