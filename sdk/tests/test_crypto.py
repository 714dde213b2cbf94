"""Tokens at rest: AES-256-GCM bound to the token, connection and member; keys rotate."""

from __future__ import annotations

import secrets

import pytest

from bastion_agent import SealError, TokenCipher, generate_key

ROW = {"token_id": "tok-1", "connection_id": "conn-1", "member_id": "mem-ada"}


def test_a_sealed_token_opens_only_for_its_own_row() -> None:
    cipher = TokenCipher(secrets.token_bytes(32))
    sealed = cipher.seal("bst_secret_token", **ROW)
    assert b"bst_secret_token" not in sealed
    assert cipher.open(sealed, **ROW) == "bst_secret_token"
    for field, other in (("token_id", "tok-2"), ("connection_id", "conn-2"), ("member_id", "mem-bob")):
        with pytest.raises(SealError, match="moved to another row"):
            cipher.open(sealed, **{**ROW, field: other})
    # Two seals of one token differ (fresh nonce).
    assert cipher.seal("bst_secret_token", **ROW) != sealed


def test_tampered_truncated_or_foreign_ciphertexts_do_not_open() -> None:
    cipher = TokenCipher(secrets.token_bytes(32))
    sealed = cipher.seal("bst_secret_token", **ROW)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError, match="tampered"):
        cipher.open(flipped, **ROW)
    with pytest.raises(SealError, match="unknown format"):
        cipher.open(sealed[:20], **ROW)
    with pytest.raises(SealError, match="unknown format"):
        cipher.open(b"xxxx" + sealed[4:], **ROW)
    with pytest.raises(SealError, match="key this agent was not given"):
        TokenCipher(secrets.token_bytes(32)).open(sealed, **ROW)


def test_keys_rotate_the_first_seals_and_every_key_opens() -> None:
    old, new = generate_key(), generate_key()
    sealed_before = TokenCipher.from_base64(old).seal("bst_before", **ROW)
    rotated = TokenCipher.from_base64(new, old)
    assert rotated.open(sealed_before, **ROW) == "bst_before"
    sealed_after = rotated.seal("bst_after", **ROW)
    with pytest.raises(SealError):
        TokenCipher.from_base64(old).open(sealed_after, **ROW)
    assert TokenCipher.from_base64(new).open(sealed_after, **ROW) == "bst_after"


def test_keys_must_be_32_bytes_and_never_show() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenCipher(b"short")
    with pytest.raises(ValueError, match="base64"):
        TokenCipher.from_base64("not base64!")
    key = secrets.token_bytes(32)
    assert key.hex() not in repr(TokenCipher(key))
    assert repr(TokenCipher(key)) == "TokenCipher(keys=<1 hidden>)"
