"""Standard Webhooks v1: HMAC-SHA256 over ``{webhook-id}.{webhook-timestamp}.{body}``, base64, ``v1,`` prefixed.

Written here rather than taken from a library so the receiver depends on nothing but the standard library for it;
the tests check it against the official ``standardwebhooks`` package both ways.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from bastion_agent._errors import WebhookRejected

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a prefix, not a secret
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
DEFAULT_TOLERANCE: Final = timedelta(minutes=5)
MAX_WEBHOOK_ID_CHARS: Final = 256
_WEBHOOK_ID: Final = re.compile(r"[A-Za-z0-9_.:-]+")
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (base64 after the prefix, 24 to 64 bytes).

    Raises:
        ValueError: not a ``whsec_`` secret, not base64, or of a length outside 24..64 bytes.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook signing secret starts with 'whsec_'")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        # Unpadded base64 is accepted too, as the reference implementation does.
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook signing secret is 'whsec_' followed by base64") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise ValueError(f"a webhook signing secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return raw


def _mac(key: bytes, webhook_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,…`` signature of one delivery (what a sender puts in ``webhook-signature``)."""
    return "v1," + base64.b64encode(_mac(secret_bytes(secret), webhook_id, str(timestamp), body)).decode("ascii")


def _presented(header: str) -> list[bytes]:
    """The v1 signatures in a ``webhook-signature`` header (space separated; other schemes are ignored)."""
    found: list[bytes] = []
    for part in header.split():
        scheme, _, value = part.partition(",")
        if scheme != "v1":
            continue
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


@dataclass(frozen=True)
class Verified:
    """A delivery that verified: its stable id (for deduplication) and the timestamp of this attempt."""

    webhook_id: str
    timestamp: datetime


class WebhookVerifier:
    """Checks ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` against one or more secrets.

    Several secrets serve a rotation: a delivery verifies when any of its v1 signatures matches any secret.

    Raises:
        ValueError: no secret, or a secret that is not a ``whsec_`` secret of 24 to 64 bytes.
    """

    __slots__ = ("_keys", "tolerance")

    def __init__(self, secrets: Iterable[str], tolerance: timedelta = DEFAULT_TOLERANCE) -> None:
        keys = tuple(secret_bytes(s) for s in secrets)
        if not keys:
            raise ValueError("give at least one webhook signing secret")
        self._keys = keys
        self.tolerance = tolerance

    def __repr__(self) -> str:
        return f"WebhookVerifier(secrets=<{len(self._keys)} hidden>, tolerance={self.tolerance!r})"

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: datetime | None = None) -> Verified:
        """The verified delivery, from lower-cased ``headers`` and the raw ``body``.

        Raises:
            WebhookRejected: a header is missing or malformed, the timestamp is more than ``tolerance`` away from
                ``now`` (either way: replays and clock-skewed forgeries alike), or no signature matches.
        """
        webhook_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        if not webhook_id or not timestamp or not signature:
            raise WebhookRejected("missing webhook-id, webhook-timestamp or webhook-signature header")
        if len(webhook_id) > MAX_WEBHOOK_ID_CHARS or not _WEBHOOK_ID.fullmatch(webhook_id):
            raise WebhookRejected("malformed webhook-id header")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise WebhookRejected("malformed webhook-timestamp header")
        # Compared in seconds: a timestamp far beyond any datetime (year 9999) is refused, not an overflow.
        sent_s, now = int(timestamp), now or datetime.now(UTC)
        if sent_s < now.timestamp() - self.tolerance.total_seconds():
            raise WebhookRejected("webhook timestamp is too old")
        if sent_s > now.timestamp() + self.tolerance.total_seconds():
            raise WebhookRejected("webhook timestamp is too far in the future")
        sent = datetime.fromtimestamp(sent_s, UTC)
        presented = _presented(signature)
        for key in self._keys:
            expected = _mac(key, webhook_id, timestamp, body)
            # Compare against every presented signature (no early exit on a match) to keep timing flat.
            matched = False
            for candidate in presented:
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                return Verified(webhook_id, sent)
        raise WebhookRejected("no webhook signature matches")
