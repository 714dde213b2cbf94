"""`bastion vault …`: rotation adds a key to the file `bastion init` wrote and moves every row to it, resumably;
retiring waits until no row needs the key; an environment-managed keyring is never edited."""

from __future__ import annotations

import base64
import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.cli.keyring_file import NewKey, add_primary_key, new_key
from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.identities import IdentitySecret
from bastion.services import identities, workspace
from bastion.settings import SECRET_SETTINGS
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault
from tests.cli.conftest import Cli, secret_file, with_store
from tests.cli.test_identities import open_secret

T = schema.identities
TOKENS = [f"ghp_{n}" + "RoTaTe" * 5 + f"{n:04d}" for n in range(3)]


@pytest.fixture
def file_cli(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """A CLI whose secrets, the vault keyring among them, live only in the config file `bastion init` wrote."""
    for name in (*SECRET_SETTINGS, "vault_keys", "vault_primary_key_id"):
        monkeypatch.delenv(f"BASTION_{name.upper()}")
    runner = Cli()
    runner("init")
    return runner


def config_file(cli_env: dict[str, str]) -> Path:
    return Path(cli_env["BASTION_DATA_DIR"]) / "bastion.toml"


def keyring_in(path: Path) -> tuple[dict[str, str], str]:
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    entries = dict(part.split("=", 1) for part in doc["vault_keys"].split(","))
    return entries, doc["vault_primary_key_id"]


def store_identities(cli: Cli, tmp_path: Path) -> list[str]:
    cli("server", "create", "github", "--url", "https://api.githubcopilot.com/mcp/")
    cli("member", "create", "alice@example.com")
    return [
        cli.json(
            "identity",
            "create",
            "--member",
            "alice@example.com",
            "--server",
            "github",
            "--bearer-token-file",
            secret_file(tmp_path, f"t{n}", token),
        )["id"]
        for n, token in enumerate(TOKENS)
    ]


def rows_by_key(cli: Cli) -> dict[str, int]:
    return {k["key_id"]: k["rows"] for k in cli.json("vault", "status")["keys"]}


def open_only_with(db_url: str, identity_id: str, key_id: str, encoded: str) -> IdentitySecret:
    """Open a row with a vault that holds nothing but ``key_id``: proof the row is wrapped under that key."""
    vault = Vault(Keyring({key_id: base64.b64decode(encoded)}, key_id))

    async def body(store: Store) -> IdentitySecret:
        ws = await workspace.default_workspace(store)
        return await identities.open_secret(store, vault, ws.id, identity_id)

    return with_store(db_url, body)


def test_vault_status_counts_rows_per_key_and_shows_no_key_material(
    file_cli: Cli, cli_env: dict[str, str], tmp_path: Path
) -> None:
    store_identities(file_cli, tmp_path)
    entries, primary = keyring_in(config_file(cli_env))
    status = file_cli.json("vault", "status")
    assert (status["managed_by"], status["config_file"], status["primary_key_id"], status["pending_rewrap"]) == (
        "config_file",
        str(config_file(cli_env)),
        primary,
        0,
    )
    assert status["keys"] == [{"key_id": primary, "rows": 3, "seals": 3, "primary": True, "in_keyring": True}]
    table = file_cli("vault", "status")
    assert primary in table.stdout
    assert all(key not in table.stdout + table.stderr + repr(status) for key in entries.values())


def test_rotate_moves_every_row_to_a_new_key_in_the_config_file_and_the_old_key_can_then_be_retired(
    file_cli: Cli, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    ids = store_identities(file_cli, tmp_path)
    path = config_file(cli_env)
    before_text = path.read_text(encoding="utf-8")
    (old_id, old_key), = keyring_in(path)[0].items()  # fmt: skip

    rotated = file_cli("vault", "rotate", "--batch", "2", "--json")
    doc = json.loads(rotated.stdout)
    new_id = doc["new_key_id"]
    assert (doc["managed_by"], doc["changed"], doc["resumed"], doc["previous_primary_key_id"]) == (
        "config_file",
        True,
        False,
        old_id,
    )
    assert (doc["primary_key_id"], doc["rewrapped"], doc["remaining"]) == (new_id, 3, 0)
    assert new_id != old_id

    entries, primary = keyring_in(path)
    assert (primary, list(entries), entries[old_id]) == (new_id, [old_id, new_id], old_key)
    assert len(base64.b64decode(entries[new_id])) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    unchanged = [line for line in before_text.splitlines() if not line.startswith("vault_")]
    assert [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("vault_")] == (
        unchanged
    )
    assert len(unchanged) > 3  # the header comment and the other secrets were kept
    assert all(key not in rotated.stdout + rotated.stderr for key in entries.values())

    assert rows_by_key(file_cli) == {old_id: 0, new_id: 3}
    for identity_id, token in zip(ids, TOKENS, strict=True):
        assert open_secret(db_url, identity_id).token == token
        assert open_only_with(db_url, identity_id, new_id, entries[new_id]).token == token

    refused = file_cli("vault", "retire", new_id, code=4)
    assert "primary" in refused.stderr
    retired = file_cli.json("vault", "retire", old_id)
    assert (retired["retired"], retired["removed_from_config_file"]) == (old_id, True)
    assert keyring_in(path) == ({new_id: entries[new_id]}, new_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert {k["key_id"]: k["in_keyring"] for k in file_cli.json("vault", "status")["keys"]} == {
        old_id: False,
        new_id: True,
    }
    assert [open_secret(db_url, i).token for i in ids] == TOKENS
    file_cli("vault", "retire", "k-ghost", code=3)


def test_retiring_a_key_that_still_seals_rows_is_refused_and_rotate_resumes_an_interrupted_rotation(
    file_cli: Cli, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    ids = store_identities(file_cli, tmp_path)
    path = config_file(cli_env)
    (old_id, _), = keyring_in(path)[0].items()  # fmt: skip
    file_cli("vault", "retire", old_id, code=4)  # the primary

    # A rotation stopped right after the key was added, before any row moved.
    added: NewKey = new_key(frozenset({old_id}))
    add_primary_key(path, added)
    assert file_cli.json("vault", "status")["pending_rewrap"] == 3
    refused = file_cli("vault", "retire", old_id, code=4)
    assert "3 row(s)" in refused.stderr
    assert old_id in keyring_in(path)[0]

    resumed = file_cli.json("vault", "rotate")
    assert (resumed["resumed"], resumed["changed"], resumed["new_key_id"]) == (True, False, None)
    assert (resumed["primary_key_id"], resumed["rewrapped"], resumed["remaining"]) == (added.key_id, 3, 0)
    assert list(keyring_in(path)[0]) == [old_id, added.key_id]  # no second key was added
    assert rows_by_key(file_cli) == {old_id: 0, added.key_id: 3}
    assert file_cli.json("vault", "rewrap")["rewrapped"] == 0
    file_cli("vault", "retire", old_id)
    assert [open_secret(db_url, i).token for i in ids] == TOKENS


def test_rotate_with_the_keyring_in_the_environment_prints_the_new_values_and_edits_nothing(
    cli: Cli, cli_env: dict[str, str], db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store_identities(cli, tmp_path)
    data_dir = Path(cli_env["BASTION_DATA_DIR"])
    files_before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and p.suffix == ".toml"}
    assert list(files_before) == [data_dir / "bastion.toml"]
    old_id = cli_env["BASTION_VAULT_PRIMARY_KEY_ID"]
    old_key = cli_env["BASTION_VAULT_KEYS"].split("=", 1)[1]

    shown = cli("vault", "rotate")
    assert "edits no file" in shown.stderr
    lines = shown.stdout.splitlines()
    keys_line = next(line.strip() for line in lines if line.strip().startswith("BASTION_VAULT_KEYS="))
    primary_line = next(line.strip() for line in lines if line.strip().startswith("BASTION_VAULT_PRIMARY_KEY_ID="))
    assert keys_line.startswith('BASTION_VAULT_KEYS="${BASTION_VAULT_KEYS},k')
    assert "bastion vault rewrap" in shown.stdout
    assert old_key not in shown.stdout + shown.stderr

    doc: dict[str, Any] = cli.json("vault", "rotate")
    assert (doc["managed_by"], doc["changed"], doc["previous_primary_key_id"]) == ("environment", False, old_id)
    assert doc["env"]["BASTION_VAULT_PRIMARY_KEY_ID"] == doc["new_key_id"]
    assert primary_line.split("=", 1)[1] != doc["new_key_id"]  # each run draws a fresh key
    assert old_key not in repr(doc)
    assert {p: p.read_bytes() for p in files_before} == files_before
    assert rows_by_key(cli) == {old_id: 3}

    # Following the printed steps: set both values, then rewrap, then retire the old key.
    keys = doc["env"]["BASTION_VAULT_KEYS"].replace("${BASTION_VAULT_KEYS}", cli_env["BASTION_VAULT_KEYS"])
    monkeypatch.setenv("BASTION_VAULT_KEYS", keys)
    monkeypatch.setenv("BASTION_VAULT_PRIMARY_KEY_ID", doc["new_key_id"])
    assert cli.json("vault", "status")["pending_rewrap"] == 3
    rewrapped = cli.json("vault", "rewrap", "--batch", "1")
    assert (rewrapped["primary_key_id"], rewrapped["rewrapped"], rewrapped["remaining"]) == (doc["new_key_id"], 3, 0)
    assert rows_by_key(cli) == {old_id: 0, doc["new_key_id"]: 3}
    retired = cli("vault", "retire", old_id)
    assert "BASTION_VAULT_KEYS" in retired.stderr
    assert [open_secret(db_url, i).token for i in ids] == TOKENS
    assert {p: p.read_bytes() for p in files_before} == files_before


def test_rebind_binds_seals_made_before_0010_with_progress_then_status_shows_none_pending(
    file_cli: Cli, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    ids = store_identities(file_cli, tmp_path)
    entries, primary = keyring_in(config_file(cli_env))
    vault = Vault(Keyring({primary: base64.b64decode(entries[primary])}, primary))

    async def as_before_0010(store: Store) -> None:
        async with store.transaction() as conn:
            await conn.execute(schema.workspaces.update().values(seals_bound_at=None))
            for identity_id, token in zip(ids, TOKENS, strict=True):
                row = (await conn.execute(sa.select(T).where(T.c.id == identity_id))).one()
                sealed = vault.seal(row.workspace_id, row.id, IdentitySecret(token=token))
                unbound = {
                    "dek_wrapped": sealed.dek_wrapped,
                    "secret_sealed": sealed.secret_sealed,
                    "sealed_bound": False,
                }
                await conn.execute(T.update().where(T.c.id == identity_id).values(unbound))

    with_store(db_url, as_before_0010)
    status = file_cli.json("vault", "status")
    assert (status["pending_rebind"], status["workspaces_accepting_unbound"]) == (3, 1)
    shown = file_cli("vault", "status")
    assert "3 identity seal(s) not yet bound" in shown.stdout
    assert "1 workspace(s) still accept seals not bound" in shown.stderr
    assert open_secret(db_url, ids[0]).token == TOKENS[0]  # an upgrade loses nothing before rebind
    done = file_cli("vault", "rebind")
    assert "bound 3 identity seal(s) to their server and owner; 0 remain" in done.stderr
    assert file_cli.json("vault", "rebind") == {"rebound": 0, "remaining": 0}
    status = file_cli.json("vault", "status")
    assert (status["pending_rebind"], status["workspaces_accepting_unbound"]) == (0, 0)
    assert [open_secret(db_url, identity_id).token for identity_id in ids] == TOKENS
