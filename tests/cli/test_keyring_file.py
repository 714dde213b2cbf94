"""Editing the keyring in the config file keeps every other line and refuses what it cannot edit safely."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from bastion.cli.keyring_file import add_primary_key, file_keyring, new_key, remove_key
from bastion.errors import ConfigError
from bastion.settings import Settings, generate_secrets

KEYS = generate_secrets()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path


def test_a_new_primary_key_goes_into_the_top_level_table_and_the_rest_of_the_file_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "bastion.toml", (
        "# keep me\n"
        f"vault_keys = \"{KEYS['vault_keys']}\"\n"
        "log_level = 'debug'  # a comment\n"
        "[extra]\n"
        "vault_keys = \"not the keyring\"\n"
    ))  # fmt: skip
    key = new_key(frozenset({KEYS["vault_primary_key_id"]}))
    add_primary_key(path, key)
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    assert doc["vault_keys"] == f"{KEYS['vault_keys']},{key.entry}"
    assert (doc["vault_primary_key_id"], doc["log_level"], doc["extra"]) == (
        key.key_id,
        "debug",
        {"vault_keys": "not the keyring"},
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# keep me"
    assert "log_level = 'debug'  # a comment" in lines
    assert lines.index("vault_primary_key_id = " + f'"{key.key_id}"') < lines.index("[extra]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.entry.split("=", 1)[1] not in repr(key)

    assert remove_key(path, "k-absent") is False
    assert remove_key(path, KEYS["vault_primary_key_id"]) is True
    assert tomllib.loads(path.read_text(encoding="utf-8"))["vault_keys"] == key.entry
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_keyring_it_cannot_edit_line_by_line_is_left_untouched(tmp_path: Path) -> None:
    text = f'vault_keys = """\n{KEYS["vault_keys"]}"""\nvault_primary_key_id = "{KEYS["vault_primary_key_id"]}"\n'
    path = write(tmp_path / "bastion.toml", text)
    with pytest.raises(ConfigError, match="by hand"):
        add_primary_key(path, new_key(frozenset()))
    assert path.read_text(encoding="utf-8") == text


def test_the_keyring_counts_as_in_the_file_only_when_the_environment_does_not_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASTION_VAULT_KEYS", raising=False)
    monkeypatch.delenv("BASTION_VAULT_PRIMARY_KEY_ID", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert file_keyring(settings) is None  # no file
    path = write(tmp_path / "bastion.toml", f'vault_keys = "{KEYS["vault_keys"]}"\n')
    assert file_keyring(settings) == path
    monkeypatch.setenv("BASTION_VAULT_PRIMARY_KEY_ID", KEYS["vault_primary_key_id"])
    assert file_keyring(settings) is None
