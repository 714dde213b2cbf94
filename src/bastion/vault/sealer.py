"""Sealing identity secrets: a fresh data key per identity, wrapped by the keyring's primary key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bastion.domain.identities import IdentitySecret
from bastion.vault.crypto import (
    DATA_KEY_ID,
    Keyring,
    UnknownKey,
    associated_data,
    new_data_key,
    open_with,
    parse,
    seal_with,
)

SECRET_FIELD = "secret"  # noqa: S105  a field name, not a secret
DATA_KEY_FIELD = "dek"


@dataclass(frozen=True, slots=True)
class Sealed:
    kek_id: str
    dek_wrapped: bytes
    secret_sealed: bytes

    def __repr__(self) -> str:
        return f"Sealed(kek_id={self.kek_id!r}, <ciphertext hidden>)"


class Vault:
    """Seals and opens identity secrets. Holds keys: never logged, never in ``repr``.

    ``reload`` re-reads the keyring when a ciphertext names a key this process has not seen yet, so a
    rotation done by another process (or the CLI) never breaks a running server.
    """

    __slots__ = ("_reload", "keyring")

    def __init__(self, keyring: Keyring, reload: Callable[[], Keyring] | None = None) -> None:
        self.keyring = keyring
        self._reload = reload

    def _unwrap(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self.keyring.unwrap(blob, aad)
        except UnknownKey:
            if self._reload is None:
                raise
            self.keyring = self._reload()
            return self.keyring.unwrap(blob, aad)

    def __repr__(self) -> str:
        return f"Vault({self.keyring!r})"

    def seal(self, workspace_id: str, identity_id: str, secret: IdentitySecret) -> Sealed:
        if self._reload is not None:
            # Seals are rare next to opens: re-read the keyring so a rotation elsewhere moves new seals too.
            self.keyring = self._reload()
        data_key = new_data_key()
        wrapped = self.keyring.wrap(data_key, associated_data(workspace_id, identity_id, DATA_KEY_FIELD))
        sealed = seal_with(
            data_key, DATA_KEY_ID, secret.to_bytes(), associated_data(workspace_id, identity_id, SECRET_FIELD)
        )
        return Sealed(self.keyring.primary_id, wrapped, sealed)

    def open(self, workspace_id: str, identity_id: str, dek_wrapped: bytes, secret_sealed: bytes) -> IdentitySecret:
        data_key = self._unwrap(dek_wrapped, associated_data(workspace_id, identity_id, DATA_KEY_FIELD))
        raw = open_with(
            data_key,
            secret_sealed,
            associated_data(workspace_id, identity_id, SECRET_FIELD),
            expected_key_id=DATA_KEY_ID,
        )
        return IdentitySecret.from_bytes(raw)

    def rewrap(self, workspace_id: str, row_id: str, dek_wrapped: bytes) -> tuple[str, bytes]:
        """The same data key wrapped under the current primary key; the sealed fields stay as they are."""
        aad = associated_data(workspace_id, row_id, DATA_KEY_FIELD)
        data_key = self._unwrap(dek_wrapped, aad)
        return self.keyring.primary_id, self.keyring.wrap(data_key, aad)

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        return parse(blob).key_id
