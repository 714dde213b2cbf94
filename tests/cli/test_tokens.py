"""`bastion token …`: tokens are listed by their last 4 characters only, and revoking one stops it at once."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.errors import Unauthenticated
from tests.cli.conftest import Cli, dump_table
from tests.cli.test_connections import resolve


@pytest.fixture
def two_connections(cli: Cli, enrolled: dict[str, Any]) -> list[dict[str, Any]]:
    cli("host", "create", "support-agent")
    made = [
        cli.json("connection", "create", "--member", "alice@example.com", "--host", host, "--gateway", "sales")
        for host in ("sales-agent", "support-agent")
    ]
    return made


def test_token_list_shows_last4_and_state_never_the_token(
    cli: Cli, two_connections: list[dict[str, Any]], db_url: str
) -> None:
    sales, support = two_connections
    listed = cli.json("token", "list")
    assert sorted((t["id"], t["connection_id"], t["last4"], t["state"], t["host"]) for t in listed) == sorted(
        (c["token"]["id"], c["connection"]["id"], c["secret"][-4:], "active", c["connection"]["host"])
        for c in two_connections
    )
    assert {t["member"] for t in listed} == {"alice@example.com"}
    assert all(t["expires_at"] is None and t["last_used_at"] is None for t in listed)
    assert [t["id"] for t in cli.json("token", "list", "--host", "support-agent")] == [support["token"]["id"]]
    assert len(cli.json("token", "list", "--member", "alice@example.com")) == 2
    assert cli.json("token", "list", "--all") == listed

    resolve(db_url, sales["secret"])
    used = {t["id"]: t for t in cli.json("token", "list")}
    assert used[sales["token"]["id"]]["last_used_at"] is not None

    table = cli("token", "list")
    everything = table.stdout + table.stderr + repr(listed) + dump_table(db_url, "access_tokens")
    assert all(c["secret"] not in everything for c in two_connections)


def test_a_revoked_token_stops_at_once_and_stays_listed(
    cli: Cli, two_connections: list[dict[str, Any]], db_url: str
) -> None:
    sales, support = two_connections
    revoked = cli.json("token", "revoke", sales["token"]["id"])
    assert (revoked["id"], revoked["state"], revoked["host"]) == (sales["token"]["id"], "revoked", "sales-agent")
    assert revoked["revoked_at"] is not None
    with pytest.raises(Unauthenticated):
        resolve(db_url, sales["secret"])
    states = {t["id"]: t["state"] for t in cli.json("token", "list")}
    assert states == {sales["token"]["id"]: "revoked", support["token"]["id"]: "active"}
    again = cli("token", "revoke", sales["token"]["id"])
    assert "revoked token" in again.stderr
    assert sales["secret"] not in again.stdout + again.stderr


def test_token_errors_map_to_exit_codes(cli: Cli, two_connections: list[dict[str, Any]]) -> None:
    cli("token", "revoke", "ghost", code=3)
    cli("token", "list", "--member", "ghost@example.com", code=3)
    cli("token", "list", "--host", "ghost", code=3)
    cli("token", "list", "--all", "--host", "sales-agent", code=2)
