"""Envelope encryption: a random data key per identity, sealed by a key-encryption key from a keyring.

Every ciphertext is ``b"v1" | len(key_id) | key_id | nonce(12) | ciphertext+tag(16)``. Associated
data binds ``workspace_id | identity_id | field`` (and for an identity, its server and owner) so a ciphertext
copied to another row or field, or a row re-pointed to another server or member, fails to open. Nothing here
touches storage; callers pass the bytes in and out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.errors import BastionError, ConfigError

VERSION: Final = b"v1"
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
MAX_KEY_ID_CHARS: Final = 64
DATA_KEY_ID: Final = "dek"
# GCM with random 96-bit nonces must stay far below 2^32 seals per key (NIST SP 800-38D); warn early.
NONCE_WARNING_SEALS: Final = 2**30


class VaultError(BastionError):
    """A ciphertext that does not open: tampered, truncated, moved, or sealed under an unknown key."""

    code = "vault_error"
    status = 500
    title = "Vault error"


class UnknownKey(VaultError):
    code = "vault_unknown_key"


def associated_data(workspace_id: str, identity_id: str, field: str, *bound: str) -> bytes:
    """``workspace_id|identity_id|field``, then whatever else the row is ``bound`` to (its server, its owner)."""
    parts = (workspace_id, identity_id, field, *bound)
    for part in parts:
        if "|" in part:
            raise ValueError("associated data parts must not contain '|'")
    return "|".join(parts).encode()


@dataclass(frozen=True, slots=True)
class Envelope:
    key_id: str
    nonce: bytes
    ciphertext: bytes


def parse(blob: bytes) -> Envelope:
    """Split a ciphertext into its parts, refusing anything that is not our format."""
    if len(blob) < len(VERSION) + 1 or blob[: len(VERSION)] != VERSION:
        raise VaultError("ciphertext has an unknown format version")
    offset = len(VERSION)
    key_len = blob[offset]
    offset += 1
    if not 0 < key_len <= MAX_KEY_ID_CHARS or len(blob) < offset + key_len + NONCE_BYTES + TAG_BYTES:
        raise VaultError("ciphertext is truncated")
    try:
        key_id = blob[offset : offset + key_len].decode("ascii")
    except UnicodeDecodeError:
        raise VaultError("ciphertext has a malformed key id") from None
    offset += key_len
    nonce = blob[offset : offset + NONCE_BYTES]
    return Envelope(key_id, nonce, blob[offset + NONCE_BYTES :])


def _encode(key_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
    raw_id = key_id.encode("ascii")
    return VERSION + bytes([len(raw_id)]) + raw_id + nonce + ciphertext


def seal_with(key: bytes, key_id: str, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> bytes:
    """AES-256-GCM under ``key``. ``nonce`` is for known-answer tests only; production draws it fresh."""
    if len(key) != KEY_BYTES:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    if not 0 < len(key_id) <= MAX_KEY_ID_CHARS:
        raise ValueError("key id must be 1-64 ASCII characters")
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    return _encode(key_id, nonce, AESGCM(key).encrypt(nonce, plaintext, aad))


def open_with(key: bytes, blob: bytes, aad: bytes, *, expected_key_id: str | None = None) -> bytes:
    envelope = parse(blob)
    if expected_key_id is not None and envelope.key_id != expected_key_id:
        raise UnknownKey(f"ciphertext was sealed under key {envelope.key_id!r}, expected {expected_key_id!r}")
    try:
        return AESGCM(key).decrypt(envelope.nonce, envelope.ciphertext, aad)
    except InvalidTag:
        raise VaultError("ciphertext failed authentication (tampered, moved to another row, or wrong key)") from None


class Keyring:
    """Key-encryption keys by id, one of them primary (new seals); the others open old ciphertexts."""

    __slots__ = ("_keys", "_lock", "_seals", "primary_id")

    def __init__(self, keys: Mapping[str, bytes], primary_id: str) -> None:
        if primary_id not in keys:
            raise ConfigError(f"vault primary key {primary_id!r} is not in the keyring")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES or not 0 < len(key_id) <= MAX_KEY_ID_CHARS or not key_id.isascii():
                raise ConfigError(f"vault key {key_id!r} must be 32 bytes with a 1-64 character ASCII id")
        self._keys = dict(keys)
        self.primary_id = primary_id
        self._seals: dict[str, int] = dict.fromkeys(keys, 0)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Keyring(key_ids={sorted(self._keys)!r}, primary_id={self.primary_id!r})"

    def keys(self) -> dict[str, bytes]:
        """A copy of the key material, for merging keyrings; never log it."""
        return dict(self._keys)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def seals(self, key_id: str) -> int:
        """Seals made under ``key_id`` by this process (the database keeps the durable count)."""
        return self._seals.get(key_id, 0)

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        """Seal a data key under the primary key-encryption key."""
        with self._lock:
            self._seals[self.primary_id] += 1
        return seal_with(self._keys[self.primary_id], self.primary_id, data_key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        envelope = parse(blob)
        key = self._keys.get(envelope.key_id)
        if key is None:
            raise UnknownKey(f"vault key {envelope.key_id!r} is not in the keyring; add it to BASTION_VAULT_KEYS")
        return open_with(key, blob, aad)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)
