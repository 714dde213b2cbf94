"""`bastion connection …`: a connection's token is printed once and stops working while it or its host is disabled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bastion import wiring
from bastion.db.store import Store
from bastion.domain.connections import Principal
from bastion.services.principals import ConnectionDisabled, HostDisabled, Resolver
from bastion.settings import load_settings
from tests.cli.conftest import Cli, dump_table, secret_file, with_store


def resolve(db_url: str, token: str) -> Principal:
    """Resolve ``token`` as the data plane would, with a fresh cache."""

    async def body(store: Store) -> Principal:
        resolver = Resolver(store, wiring.hasher_from(load_settings()))
        try:
            return await resolver.resolve(token, gateway="sales", host="sales-agent")
        finally:
            resolver.close()

    return with_store(db_url, body)


def test_connection_token_resolves_and_stops_while_the_connection_or_host_is_disabled(
    cli: Cli, enrolled: dict[str, Any], db_url: str
) -> None:
    created = cli.json("connection", "create", "--member", "alice@example.com", "--host", "sales-agent",
                       "--gateway", "sales")  # fmt: skip
    connection, token, secret = created["connection"], created["token"], created["secret"]
    assert secret.startswith("bst_")
    assert (connection["member"], connection["host"], connection["gateway"], connection["enabled"]) == (
        "alice@example.com",
        "sales-agent",
        "sales",
        True,
    )
    assert connection["identities"] == {"github": enrolled["identity"]["id"]}
    assert (token["connection_id"], token["last4"], token["state"]) == (connection["id"], secret[-4:], "active")

    principal = resolve(db_url, secret)
    assert (principal.member_email, principal.connection_id, principal.token_id) == (
        "alice@example.com",
        connection["id"],
        token["id"],
    )
    assert principal.identities == {"github": enrolled["identity"]["id"]}

    assert cli.json("connection", "disable", connection["id"])["enabled"] is False
    with pytest.raises(ConnectionDisabled):
        resolve(db_url, secret)
    assert [(t["id"], t["state"]) for t in cli.json("token", "list")] == [(token["id"], "active")]

    assert cli.json("connection", "enable", connection["id"])["enabled"] is True
    assert resolve(db_url, secret).token_id == token["id"]
    cli("host", "disable", "sales-agent")
    with pytest.raises(HostDisabled):
        resolve(db_url, secret)
    cli("host", "enable", "sales-agent")
    assert resolve(db_url, secret).token_id == token["id"]
    assert secret not in dump_table(db_url, "access_tokens")


def test_the_table_view_prints_the_token_once_on_its_own_line(cli: Cli, enrolled: dict[str, Any]) -> None:
    result = cli("connection", "create", "--member", "alice@example.com", "--host", "sales-agent",
                 "--gateway", "sales")  # fmt: skip
    tokens = [line for line in result.stdout.splitlines() if line.startswith("bst_")]
    assert len(tokens) == 1
    assert "shown once" in result.stderr
    [connection] = cli.json("connection", "list")
    later = [
        cli("connection", "list"),
        cli("connection", "show", connection["id"]),
        cli("token", "list"),
        cli("connection", "disable", connection["id"]),
    ]
    assert all(tokens[0] not in r.stdout + r.stderr for r in later)
    assert "Connections" in later[0].stdout


def test_connection_lifecycle_through_the_cli(cli: Cli, enrolled: dict[str, Any], tmp_path: Path) -> None:
    cli("member", "create", "bob@example.com")
    cli("host", "create", "support-agent")
    second = cli.json("identity", "create", "--member", "alice@example.com", "--server", "github",
                      "--bearer-token-file", secret_file(tmp_path, "t2", "ghp_" + "sEcOnD" * 5))  # fmt: skip
    # Two identities for one server: the connection must be told which one to use.
    base = ("connection", "create", "--member", "alice@example.com", "--gateway", "sales")
    cli(*base, "--host", "sales-agent", code=2)
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    first = cli.json(*base, "--host", "sales-agent", "--identity", f"github={enrolled['identity']['id']}",
                     "--token-expires", expires.replace(tzinfo=None).isoformat())  # fmt: skip
    assert first["token"]["expires_at"] == expires.isoformat().replace("+00:00", "Z")  # a time without zone is UTC
    other = cli.json(*base, "--host", "support-agent", "--identity", f"github={second['id']}")
    connection_id = first["connection"]["id"]

    assert {c["host"] for c in cli.json("connection", "list")} == {"sales-agent", "support-agent"}
    assert [c["id"] for c in cli.json("connection", "list", "--host", "support-agent")] == [other["connection"]["id"]]
    assert cli.json("connection", "list", "--member", "bob@example.com") == []
    assert cli.json("connection", "show", connection_id)["identities"] == {"github": enrolled["identity"]["id"]}

    moved = cli.json("connection", "set-identity", connection_id, "github", second["id"])
    assert (moved["identities"], moved["version"]) == ({"github": second["id"]}, 2)

    minted = cli.json("connection", "mint-token", connection_id)
    assert minted["secret"].startswith("bst_")
    assert minted["secret"] != first["secret"]
    assert minted["token"]["connection_id"] == connection_id
    assert sorted(t["id"] for t in cli.json("token", "list", "--member", "alice@example.com")) == sorted(
        [first["token"]["id"], minted["token"]["id"], other["token"]["id"]]
    )

    assert cli.json("connection", "delete", connection_id) == {"deleted": True, "id": connection_id}
    assert [c["id"] for c in cli.json("connection", "list")] == [other["connection"]["id"]]
    assert [t["id"] for t in cli.json("token", "list")] == [other["token"]["id"]]


def test_connection_errors_map_to_exit_codes(cli: Cli, enrolled: dict[str, Any]) -> None:
    base = ("connection", "create", "--host", "sales-agent", "--gateway", "sales")
    cli("member", "create", "bob@example.com")
    cli(*base, "--member", "bob@example.com", code=2)  # no identity for the per-user server
    cli(*base, "--member", "ghost@example.com", code=3)
    cli("connection", "create", "--member", "alice@example.com", "--host", "ghost", "--gateway", "sales", code=3)
    cli(*base, "--member", "alice@example.com", "--identity", "nope=x", code=2)
    cli(*base, "--member", "alice@example.com", "--identity", "github", code=2)
    cli(*base, "--member", "alice@example.com", "--token-expires", "soon", code=2)
    cli(*base, "--member", "alice@example.com", "--token-expires", "2001-01-01T00:00:00Z", code=2)
    created = cli.json(*base, "--member", "alice@example.com")
    connection_id = created["connection"]["id"]
    cli("connection", "set-identity", connection_id, "github", "ghost", code=3)
    cli("connection", "list", "--member", "alice@example.com", "--all", code=2)
    for command in ("show", "disable", "enable", "delete", "mint-token"):
        cli("connection", command, "ghost", code=3)
