"""Where the vault keyring lives, and editing it in the config file `bastion init` wrote: atomically, mode 0600."""

from __future__ import annotations

import base64
import os
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bastion.errors import ConfigError
from bastion.settings import VAULT_KEY_BYTES, Settings

KEYS_FIELD: Final = "vault_keys"
PRIMARY_FIELD: Final = "vault_primary_key_id"
ENV_KEYS: Final = "BASTION_VAULT_KEYS"
ENV_PRIMARY: Final = "BASTION_VAULT_PRIMARY_KEY_ID"
CONFIG_FILE_MODE: Final = 0o600
_TOP_LEVEL_ASSIGNMENT: Final = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_TABLE_HEADER: Final = re.compile(r"^\s*\[")


@dataclass(frozen=True, slots=True)
class NewKey:
    """A fresh key-encryption key. ``repr`` never shows the key."""

    key_id: str
    encoded: str

    def __repr__(self) -> str:
        return f"NewKey(key_id={self.key_id!r}, <key hidden>)"

    @property
    def entry(self) -> str:
        """The ``key_id=base64`` entry of a keyring."""
        return f"{self.key_id}={self.encoded}"


def new_key(existing_ids: frozenset[str]) -> NewKey:
    """32 random bytes under an id not yet used, drawn again in the (negligible) case the checks would refuse it."""
    while True:
        key_id = "k" + secrets.token_hex(4)
        key = secrets.token_bytes(VAULT_KEY_BYTES)
        if key_id not in existing_ids and len(set(key)) >= VAULT_KEY_BYTES // 4:
            return NewKey(key_id, base64.b64encode(key).decode("ascii"))


def environment_sets_keyring() -> bool:
    return bool(os.environ.get(ENV_KEYS, "").strip() or os.environ.get(ENV_PRIMARY, "").strip())


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def file_keyring(settings: Settings) -> Path | None:
    """The config file holding the keyring, or None when the environment sets it (or no file does)."""
    path = settings.resolved_config_file
    if environment_sets_keyring() or not path.is_file():
        return None
    return path if isinstance(_read(path).get(KEYS_FIELD), str) else None


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _entries(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _rewrite(path: Path, values: dict[str, str]) -> None:
    """Set top-level string ``values`` in the TOML file, keeping every other line; refuse if the result reads wrong."""
    before = _read(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    top_level_end = next((i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)), len(lines))
    pending = dict(values)
    out: list[str] = []
    for index, line in enumerate(lines):
        match = _TOP_LEVEL_ASSIGNMENT.match(line) if index < top_level_end else None
        if index == top_level_end:
            out += [f"{k} = {_toml_string(v)}\n" for k, v in pending.items()]
            pending.clear()
        if match and match.group(1) in values:
            if match.group(1) in pending:
                out.append(f"{match.group(1)} = {_toml_string(pending.pop(match.group(1)))}\n")
            continue
        out.append(line)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    out += [f"{k} = {_toml_string(v)}\n" for k, v in pending.items()]
    text = "".join(out)
    try:
        after = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        after = None
    if after != {**before, **values}:
        # A multi-line or otherwise unusual value: editing it line by line would lose something.
        raise ConfigError(f"cannot safely edit {path}; set {KEYS_FIELD} and {PRIMARY_FIELD} in it by hand")
    _write_atomically(path, text)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CONFIG_FILE_MODE)
    try:
        os.fchmod(fd, CONFIG_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def add_primary_key(path: Path, key: NewKey) -> None:
    """Append ``key`` to the file's keyring and make it the primary key."""
    raw = _read(path).get(KEYS_FIELD, "")
    _rewrite(path, {KEYS_FIELD: ",".join([*_entries(str(raw)), key.entry]), PRIMARY_FIELD: key.key_id})


def remove_key(path: Path, key_id: str) -> bool:
    """Drop ``key_id`` from the file's keyring; False when it was not there."""
    raw = str(_read(path).get(KEYS_FIELD, ""))
    kept = [entry for entry in _entries(raw) if entry.partition("=")[0].strip() != key_id]
    if len(kept) == len(_entries(raw)):
        return False
    _rewrite(path, {KEYS_FIELD: ",".join(kept)})
    return True
