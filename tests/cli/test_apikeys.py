"""`bastion apikey …`: a key is printed once, works for its member, lists without its secret, and revokes."""

from __future__ import annotations

import anyio
import pytest

from bastion.db.store import Store
from bastion.errors import Unauthenticated
from bastion.services import apikeys
from bastion.services.apikeys import KeyHasher
from tests.cli.conftest import Cli


async def _authenticate(env: dict[str, str], secret: str) -> str:
    store = Store.from_url(env["BASTION_DATABASE_URL"])
    try:
        actor = await apikeys.authenticate(store, KeyHasher(env["BASTION_TOKEN_PEPPER"].encode("utf-8")), secret)
    finally:
        await store.close()
    return actor.label


def test_api_key_lifecycle_through_the_cli(cli: Cli, cli_env: dict[str, str]) -> None:
    cli("member", "create", "ada@example.com", "--role", "admin")
    cli("member", "create", "bob@example.com")
    created = cli.json("apikey", "create", "--member", "ada@example.com", "--name", "terraform")
    secret = created["secret"]
    assert secret.startswith("bsk_")
    assert created["key"]["last4"] == secret[-4:]
    assert created["key"]["member"] == "ada@example.com"
    assert anyio.run(_authenticate, cli_env, secret) == "ada@example.com"

    bob = cli.json("apikey", "create", "--member", "bob@example.com", "--name", "laptop", "--expires-in-days", "30")
    assert bob["key"]["expires_at"] is not None

    listed = cli("apikey", "list", "--json").stdout
    assert secret not in listed
    assert bob["secret"] not in listed
    assert [(k["member"], k["name"]) for k in cli.json("apikey", "list")] == [
        ("ada@example.com", "terraform"),
        ("bob@example.com", "laptop"),
    ]
    assert [k["name"] for k in cli.json("apikey", "list", "--member", "bob@example.com")] == ["laptop"]
    assert cli.json("apikey", "show", created["key"]["id"])["name"] == "terraform"

    revoked = cli.json("apikey", "revoke", created["key"]["id"])
    assert revoked["revoked_at"] is not None
    with pytest.raises(Unauthenticated):
        anyio.run(_authenticate, cli_env, secret)
    assert anyio.run(_authenticate, cli_env, bob["secret"]) == "bob@example.com"


def test_the_table_output_prints_the_new_key_once(cli: Cli) -> None:
    cli("member", "create", "ada@example.com")
    result = cli("apikey", "create", "--member", "ada@example.com", "--name", "ci")
    assert result.stdout.count("bsk_") == 1
    assert "shown once" in result.stdout


def test_api_key_errors_map_to_exit_codes(cli: Cli) -> None:
    cli("apikey", "create", "--member", "ghost@example.com", "--name", "x", code=3)
    cli("apikey", "show", "01a20a62-0000-7000-8000-000000000000", code=3)
    cli("apikey", "revoke", "01a20a62-0000-7000-8000-000000000000", code=3)
    cli("member", "create", "ada@example.com")
    cli("apikey", "create", "--member", "ada@example.com", "--name", " ", code=2)
    cli("apikey", "create", "--member", "ada@example.com", "--name", "x", "--expires-in-days", "0", code=2)
    cli("apikey", "create", "--member", "ada@example.com", code=2)
