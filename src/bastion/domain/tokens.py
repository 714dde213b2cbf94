"""Secret token format shared by member API keys (`bsk_`) and access tokens (`bst_`).

A token is ``prefix + 32 base62 characters (190 bits from the OS CSPRNG) + 6 base62 characters of
CRC32`` over the prefix and body. The checksum lets a typo or a truncated paste be refused before any
database lookup, and lets secret scanners recognise our tokens.
"""

from __future__ import annotations

import secrets
import zlib
from datetime import timedelta
from typing import Final

BASE62_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_CHARS: Final = 32
CHECKSUM_CHARS: Final = 6
API_KEY_PREFIX: Final = "bsk_"
ACCESS_TOKEN_PREFIX: Final = "bst_"  # noqa: S105  a prefix, not a secret
LINK_PREFIX: Final = "bsl_"
HOST_KEY_PREFIX: Final = "bsh_"  # a host's own credential (redeeming claim codes)
CLAIM_CODE_PREFIX: Final = "bsc_"  # one-time code in a webhook event, redeemed for the token it stands for
_ALPHABET_SET: Final = frozenset(BASE62_ALPHABET)
# Tokens and keys record their last use at most this often: an audit hint, not a write per request.
LAST_USED_WRITE_INTERVAL: Final = timedelta(minutes=1)


def _base62(number: int, width: int) -> str:
    chars: list[str] = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(BASE62_ALPHABET[digit])
    return "".join(reversed(chars))


def _checksum(prefix: str, body: str) -> str:
    return _base62(zlib.crc32((prefix + body).encode("ascii")), CHECKSUM_CHARS)


def mint(prefix: str) -> str:
    """A fresh token with the given prefix."""
    body = "".join(secrets.choice(BASE62_ALPHABET) for _ in range(BODY_CHARS))
    return prefix + body + _checksum(prefix, body)


def well_formed(token: str, prefix: str) -> bool:
    """True when ``token`` has the prefix, the length, the alphabet and a matching checksum."""
    if len(token) != len(prefix) + BODY_CHARS + CHECKSUM_CHARS or not token.startswith(prefix):
        return False
    rest = token[len(prefix) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    body, check = rest[:BODY_CHARS], rest[BODY_CHARS:]
    return secrets.compare_digest(_checksum(prefix, body), check)


def last4(token: str) -> str:
    return token[-4:]
