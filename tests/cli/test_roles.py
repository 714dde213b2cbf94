"""`bastion role …`: custom roles, the locked owner role, and capabilities named exactly."""

from __future__ import annotations

from tests.cli.conftest import Cli


def test_role_lifecycle_through_the_cli(cli: Cli) -> None:
    created = cli.json("role", "create", "auditor", "-c", "audit.view_export", "--description", "Reads the log")
    assert (created["name"], created["capabilities"], created["builtin"]) == ("auditor", ["audit.view_export"], False)
    assert {r["name"] for r in cli.json("role", "list")} == {"owner", "admin", "member", "auditor"}
    assert cli.json("role", "show", created["id"])["description"] == "Reads the log"

    added = cli.json("role", "update", "auditor", "--add", "admin.view", "--add", "hosts.disable_enable")
    assert added["capabilities"] == ["admin.view", "audit.view_export", "hosts.disable_enable"]
    removed = cli.json("role", "update", "auditor", "--remove", "audit.view_export")
    assert removed["capabilities"] == ["admin.view", "hosts.disable_enable"]
    replaced = cli.json("role", "update", "auditor", "-c", "tokens.manage", "--name", "token-keeper")
    assert (replaced["name"], replaced["capabilities"], replaced["description"]) == (
        "token-keeper",
        ["tokens.manage"],
        "Reads the log",
    )

    assert cli.json("role", "delete", "token-keeper")["deleted"] is True
    assert {r["name"] for r in cli.json("role", "list")} == {"owner", "admin", "member"}


def test_capabilities_lists_every_capability_with_its_label(cli: Cli) -> None:
    docs = cli.json("role", "capabilities")
    assert {"name": "hosts.disable_enable", "label": "Disable and enable hosts"} in docs


def test_unknown_capability_exits_2(cli: Cli) -> None:
    result = cli("role", "create", "x", "-c", "everything.all", code=2)
    assert "unknown capability" in result.stderr


def test_role_errors_map_to_exit_codes(cli: Cli) -> None:
    cli("role", "show", "ghost", code=3)
    cli("role", "create", "auditor")
    cli("role", "create", "auditor", code=4)
    cli("member", "create", "ada@example.com", "--role", "auditor")
    result = cli("role", "delete", "auditor", code=4)
    assert "members still hold it" in result.stderr
    cli("role", "update", "owner", "--add", "admin.view", code=5)
    cli("role", "delete", "admin", code=5)
