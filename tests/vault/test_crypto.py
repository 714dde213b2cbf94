"""The envelope format: known answers, tamper detection, associated-data binding, nonces, keyring errors."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.domain.identities import IdentitySecret, bearer_secret
from bastion.errors import ConfigError
from bastion.vault.crypto import (
    Keyring,
    UnknownKey,
    VaultError,
    associated_data,
    open_with,
    parse,
    seal_with,
)
from bastion.vault.sealer import Vault

ZERO_KEY = bytes(32)
ZERO_NONCE = bytes(12)


def test_aes_256_gcm_known_answer_matches_the_gcm_specification_test_case_14() -> None:
    # McGrew & Viega, "The Galois/Counter Mode of Operation", test case 14: K=0^256, IV=0^96, P=0^128, no AAD.
    blob = seal_with(ZERO_KEY, "k1", bytes(16), b"", nonce=ZERO_NONCE)
    expected_ct = bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18")
    expected_tag = bytes.fromhex("d0d1c8a799996bf0265b98b5d48ab919")
    assert blob == b"v1" + bytes([2]) + b"k1" + ZERO_NONCE + expected_ct + expected_tag
    assert open_with(ZERO_KEY, blob, b"") == bytes(16)


def test_envelope_header_names_version_and_key_id() -> None:
    blob = seal_with(os.urandom(32), "primary-2026", b"secret", b"aad")
    envelope = parse(blob)
    assert envelope.key_id == "primary-2026"
    assert len(envelope.nonce) == 12
    assert len(envelope.ciphertext) == len(b"secret") + 16


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_flipping_any_byte_fails_loudly(data: st.DataObject) -> None:
    key = bytes(range(32))
    blob = seal_with(key, "k1", b"bearer ada-token", b"ws|id|secret")
    index = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(blob)
    tampered[index] ^= flip
    with pytest.raises(VaultError):
        open_with(key, bytes(tampered), b"ws|id|secret", expected_key_id="k1")


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 10, 20, 30])
def test_truncated_ciphertext_is_a_typed_error(cut: int) -> None:
    blob = seal_with(ZERO_KEY, "k1", b"x" * 8, b"")
    with pytest.raises(VaultError):
        open_with(ZERO_KEY, blob[:cut], b"")


def test_wrong_key_and_wrong_associated_data_never_yield_plaintext() -> None:
    blob = seal_with(ZERO_KEY, "k1", b"plain", b"ws|a|secret")
    with pytest.raises(VaultError):
        open_with(bytes([1]) * 32, blob, b"ws|a|secret")
    with pytest.raises(VaultError):
        open_with(ZERO_KEY, blob, b"ws|b|secret")


def test_nonces_are_unique_over_many_seals() -> None:
    key = os.urandom(32)
    nonces = {parse(seal_with(key, "k", b"", b"")).nonce for _ in range(100_000)}
    assert len(nonces) == 100_000


def test_keyring_counts_seals_per_key_and_names_missing_keys() -> None:
    keyring = Keyring({"a": os.urandom(32), "b": os.urandom(32)}, "b")
    aad = associated_data("ws", "id", "dek")
    for _ in range(5):
        keyring.wrap(os.urandom(32), aad)
    assert keyring.seals("b") == 5
    assert keyring.seals("a") == 0
    other = Keyring({"c": os.urandom(32)}, "c")
    with pytest.raises(UnknownKey, match="'b'"):
        other.unwrap(keyring.wrap(os.urandom(32), aad), aad)


def test_keyring_refuses_a_primary_that_is_not_in_it() -> None:
    with pytest.raises(ConfigError, match="'missing'"):
        Keyring({"a": os.urandom(32)}, "missing")


def test_identity_ciphertexts_do_not_open_under_another_row_or_field() -> None:
    vault = Vault(Keyring({"k": os.urandom(32)}, "k"))
    ada = vault.seal("ws", "ada-id", bearer_secret("ada-secret-token"))
    bob = vault.seal("ws", "bob-id", bearer_secret("bob-secret-token"))
    assert vault.open("ws", "ada-id", ada.dek_wrapped, ada.secret_sealed).token == "ada-secret-token"
    with pytest.raises(VaultError):  # ciphertext copied to another row
        vault.open("ws", "bob-id", bob.dek_wrapped, ada.secret_sealed)
    with pytest.raises(VaultError):  # both columns copied to another row
        vault.open("ws", "bob-id", ada.dek_wrapped, ada.secret_sealed)
    with pytest.raises(VaultError):  # fields swapped within one row
        vault.open("ws", "ada-id", ada.secret_sealed, ada.dek_wrapped)
    with pytest.raises(VaultError):  # another workspace
        vault.open("ws2", "ada-id", ada.dek_wrapped, ada.secret_sealed)


def test_rewrap_moves_the_data_key_to_the_new_primary_without_touching_the_ciphertext() -> None:
    old, new = os.urandom(32), os.urandom(32)
    before = Vault(Keyring({"old": old}, "old"))
    sealed = before.seal("ws", "id", bearer_secret("tok-123456789"))
    after = Vault(Keyring({"old": old, "new": new}, "new"))
    kek, wrapped = after.rewrap("ws", "id", sealed.dek_wrapped)
    assert kek == "new"
    assert parse(wrapped).key_id == "new"
    assert after.open("ws", "id", wrapped, sealed.secret_sealed).token == "tok-123456789"


def test_vault_reloads_the_keyring_when_a_ciphertext_names_a_new_key() -> None:
    old, new = os.urandom(32), os.urandom(32)
    rotated = Vault(Keyring({"old": old, "new": new}, "new"))
    sealed = rotated.seal("ws", "id", bearer_secret("tok-abcdefghij"))
    stale = Vault(Keyring({"old": old}, "old"), reload=lambda: Keyring({"old": old, "new": new}, "new"))
    assert stale.open("ws", "id", sealed.dek_wrapped, sealed.secret_sealed).token == "tok-abcdefghij"
    assert stale.keyring.primary_id == "new"


def test_secrets_never_show_in_repr() -> None:
    secret = IdentitySecret(token="canary-token-value", refresh_token="canary-refresh")
    vault = Vault(Keyring({"k": bytes(range(32))}, "k"))
    sealed = vault.seal("ws", "id", secret)
    for text in (repr(secret), str(secret), repr(vault), repr(sealed), repr(vault.keyring)):
        assert "canary" not in text
        assert bytes(range(32)).hex() not in text


def test_new_seals_follow_a_primary_switched_by_another_process() -> None:
    old, new = os.urandom(32), os.urandom(32)
    current = {"ring": Keyring({"old": old}, "old")}
    vault = Vault(current["ring"], reload=lambda: current["ring"])
    assert vault.seal("ws", "a", bearer_secret("token-aaaaaaaa")).kek_id == "old"
    current["ring"] = Keyring({"old": old, "new": new}, "new")
    assert vault.seal("ws", "b", bearer_secret("token-bbbbbbbb")).kek_id == "new"
