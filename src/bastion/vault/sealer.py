"""Sealing identity secrets: a fresh data key per identity, wrapped by the keyring's primary key.

An identity's seal is bound to its server and owner too (`Binding`), so a row re-pointed to another server or
member does not open; db/seals.py says which binding a row's seal has and whether an unbound one may still open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bastion.domain.identities import IdentitySecret
from bastion.vault.crypto import (
    DATA_KEY_ID,
    Keyring,
    UnknownKey,
    VaultError,
    associated_data,
    new_data_key,
    open_with,
    parse,
    seal_with,
)

SECRET_FIELD = "secret"  # noqa: S105  a field name, not a secret
DATA_KEY_FIELD = "dek"


class Unbound(VaultError):
    """An identity sealed without a binding where every seal is bound (db/seals.py)."""

    code = "vault_unbound"


@dataclass(frozen=True, slots=True)
class Binding:
    """What an identity's seal is bound to besides its workspace and id: its server, and its owner (None: global)."""

    server_id: str
    owner_id: str | None

    @property
    def parts(self) -> tuple[str, str]:
        return (f"server:{self.server_id}", f"owner:{self.owner_id or '-'}")


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

    def seal(
        self, workspace_id: str, identity_id: str, secret: IdentitySecret, binding: Binding | None = None
    ) -> Sealed:
        if self._reload is not None:
            # Seals are rare next to opens: re-read the keyring so a rotation elsewhere moves new seals too.
            self.keyring = self._reload()
        bound = binding.parts if binding is not None else ()
        data_key = new_data_key()
        wrapped = self.keyring.wrap(data_key, associated_data(workspace_id, identity_id, DATA_KEY_FIELD, *bound))
        sealed = seal_with(
            data_key, DATA_KEY_ID, secret.to_bytes(), associated_data(workspace_id, identity_id, SECRET_FIELD, *bound)
        )
        return Sealed(self.keyring.primary_id, wrapped, sealed)

    def open(
        self,
        workspace_id: str,
        identity_id: str,
        dek_wrapped: bytes,
        secret_sealed: bytes,
        binding: Binding | None = None,
    ) -> IdentitySecret:
        bound = binding.parts if binding is not None else ()
        data_key = self._unwrap(dek_wrapped, associated_data(workspace_id, identity_id, DATA_KEY_FIELD, *bound))
        raw = open_with(
            data_key,
            secret_sealed,
            associated_data(workspace_id, identity_id, SECRET_FIELD, *bound),
            expected_key_id=DATA_KEY_ID,
        )
        return IdentitySecret.from_bytes(raw)

    def rewrap(
        self, workspace_id: str, row_id: str, dek_wrapped: bytes, binding: Binding | None = None
    ) -> tuple[str, bytes]:
        """The same data key wrapped under the current primary key; the sealed fields stay as they are."""
        aad = associated_data(workspace_id, row_id, DATA_KEY_FIELD, *(binding.parts if binding is not None else ()))
        data_key = self._unwrap(dek_wrapped, aad)
        return self.keyring.primary_id, self.keyring.wrap(data_key, aad)

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        return parse(blob).key_id
