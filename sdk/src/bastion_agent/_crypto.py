"""Tokens at rest: AES-256-GCM under a key the agent provides, bound to the row and the person they belong to.

A sealed token is ``b"bat1" | key fingerprint (8) | nonce (12) | ciphertext + tag (16)``. The associated data names the
token id, the connection and the member, so a ciphertext copied onto another person's row does not open. The
fingerprint (the first 8 bytes of SHA-256 of the key) picks the key among those configured, so keys can rotate: seal
with the first, open with any.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion_agent._errors import SealError

FORMAT: Final = b"bat1"
KEY_BYTES: Final = 32
FINGERPRINT_BYTES: Final = 8
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16


def generate_key() -> str:
    """A fresh 32-byte key, base64 encoded: what ``TokenCipher.from_base64`` takes (keep it in a secret store)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def _fingerprint(key: bytes) -> bytes:
    return hashlib.sha256(b"bastion-agent key fingerprint\x00" + key).digest()[:FINGERPRINT_BYTES]


def _aad(token_id: str, connection_id: str, member_id: str) -> bytes:
    return "\x00".join(("bastion-agent token", token_id, connection_id, member_id)).encode("utf-8")


class TokenCipher:
    """Seals and opens access tokens. The first key seals; every key given opens (for rotation).

    Raises:
        ValueError: no key, or a key that is not 32 bytes.
    """

    __slots__ = ("_keys", "_sealing")

    def __init__(self, key: bytes, *older: bytes) -> None:
        keys = (key, *older)
        if any(len(k) != KEY_BYTES for k in keys):
            raise ValueError(f"a token key is {KEY_BYTES} bytes (AES-256)")
        self._sealing = (_fingerprint(key), AESGCM(key))
        self._keys = {_fingerprint(k): AESGCM(k) for k in keys}

    @classmethod
    def from_base64(cls, key: str, *older: str) -> TokenCipher:
        """A cipher from base64 keys (as ``generate_key`` makes them).

        Raises:
            ValueError: a key that is not base64 or not 32 bytes.
        """
        try:
            raw = [base64.b64decode(k, validate=True) for k in (key, *older)]
        except (binascii.Error, ValueError):
            raise ValueError("a token key is base64 text") from None
        return cls(raw[0], *raw[1:])

    def __repr__(self) -> str:
        return f"TokenCipher(keys=<{len(self._keys)} hidden>)"

    def seal(self, token: str, *, token_id: str, connection_id: str, member_id: str) -> bytes:
        fingerprint, aead = self._sealing
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, token.encode("utf-8"), _aad(token_id, connection_id, member_id))
        return FORMAT + fingerprint + nonce + sealed

    def open(self, blob: bytes, *, token_id: str, connection_id: str, member_id: str) -> str:
        """The token sealed in ``blob`` for exactly this token id, connection and member.

        Raises:
            SealError: not our format, sealed under a key not configured, tampered with or moved to another row.
        """
        head = len(FORMAT) + FINGERPRINT_BYTES
        if len(blob) < head + NONCE_BYTES + TAG_BYTES or blob[: len(FORMAT)] != FORMAT:
            raise SealError("the sealed token has an unknown format")
        aead = self._keys.get(blob[len(FORMAT) : head])
        if aead is None:
            raise SealError("the sealed token was sealed under a key this agent was not given")
        nonce = blob[head : head + NONCE_BYTES]
        try:
            plain = aead.decrypt(nonce, blob[head + NONCE_BYTES :], _aad(token_id, connection_id, member_id))
        except InvalidTag:
            raise SealError("the sealed token does not open: tampered with or moved to another row") from None
        return plain.decode("utf-8")
