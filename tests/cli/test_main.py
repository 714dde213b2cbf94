"""`bastion init` and `bastion db …`: idempotent preparation and clean errors instead of tracebacks."""

from __future__ import annotations

import pytest

from tests.cli.conftest import Cli


def test_init_twice_keeps_the_same_workspace_and_owner(cli: Cli) -> None:
    first = cli.json("init", "--owner-email", "root@example.com")
    second = cli.json("init", "--owner-email", "root@example.com")
    assert first["workspace_id"] == second["workspace_id"]
    assert first["owner"]["created"] is True
    assert first["owner"]["api_key"].startswith("bsk_")
    assert second["owner"] == {
        "id": first["owner"]["id"],
        "email": "root@example.com",
        "created": False,
        "api_key": None,
    }
    assert [m["email"] for m in cli.json("member", "list")] == ["root@example.com"]
    assert [k["member"] for k in cli.json("apikey", "list")] == ["root@example.com"]


def test_db_current_reports_an_up_to_date_database(cli: Cli) -> None:
    doc = cli.json("db", "current")
    assert doc["up_to_date"] is True
    assert doc["current"] == doc["head"]


def test_db_upgrade_on_a_current_database_is_a_no_op(cli: Cli) -> None:
    result = cli("db", "upgrade")
    assert "database at revision" in result.stderr
    assert cli.json("db", "current")["up_to_date"] is True


@pytest.mark.parametrize("command", [("db", "current"), ("db", "upgrade"), ("db", "downgrade", "base")])
def test_db_commands_with_an_unsupported_database_url_exit_6_without_a_traceback(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    monkeypatch.setenv("BASTION_DATABASE_URL", "mysql://root@localhost/bastion")
    result = cli(*command, code=6)
    assert "config_invalid" in result.stderr
    assert "Traceback" not in result.output


def test_admin_commands_without_secrets_exit_6_naming_what_is_missing(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASTION_TOKEN_PEPPER")
    result = cli("host", "list", code=6)
    assert "BASTION_TOKEN_PEPPER is missing" in result.stderr
