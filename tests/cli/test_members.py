"""`bastion member …`: create, list, show, update and delete, with exit codes scripts can rely on."""

from __future__ import annotations

from tests.cli.conftest import Cli


def test_member_lifecycle_through_the_cli(cli: Cli) -> None:
    created = cli.json("member", "create", "Ada@Example.com", "--name", "Ada Lovelace", "--role", "admin")
    assert (created["email"], created["name"], created["role"], created["status"]) == (
        "ada@example.com",
        "Ada Lovelace",
        "admin",
        "active",
    )
    cli("member", "create", "bob@example.com")
    listed = cli.json("member", "list")
    assert [(m["email"], m["name"], m["role"]) for m in listed] == [
        ("ada@example.com", "Ada Lovelace", "admin"),
        ("bob@example.com", "bob", "member"),
    ]
    assert cli.json("member", "show", created["id"])["email"] == "ada@example.com"

    updated = cli.json("member", "update", "ada@example.com", "--status", "disabled")
    assert (updated["status"], updated["name"], updated["role"], updated["version"]) == (
        "disabled",
        "Ada Lovelace",
        "admin",
        2,
    )
    assert [m["email"] for m in cli.json("member", "list", "--status", "disabled")] == ["ada@example.com"]

    deleted = cli.json("member", "delete", "ada@example.com")
    assert deleted == {"deleted": True, "id": created["id"], "email": "ada@example.com"}
    assert [m["email"] for m in cli.json("member", "list")] == ["bob@example.com"]


def test_member_table_output_names_each_member(cli: Cli) -> None:
    cli("member", "create", "ada@example.com")
    result = cli("member", "list")
    assert "ada@example.com" in result.stdout
    assert "Members" in result.stdout


def test_unknown_member_exits_3(cli: Cli) -> None:
    result = cli("member", "show", "nobody@example.com", code=3)
    assert "not_found" in result.stderr
    cli("member", "delete", "nobody@example.com", code=3)
    cli("member", "update", "nobody@example.com", "--name", "X", code=3)


def test_duplicate_email_exits_4(cli: Cli) -> None:
    cli("member", "create", "ada@example.com")
    result = cli("member", "create", "ADA@example.com", code=4)
    assert "conflict" in result.stderr


def test_invalid_member_input_exits_2(cli: Cli) -> None:
    cli("member", "create", "not-an-email", code=2)
    assert "no role named" in cli("member", "create", "ada@example.com", "--role", "no-such-role", code=3).stderr
    cli("member", "create", "ada@example.com")
    cli("member", "update", "ada@example.com", code=2)
    cli("member", "update", "ada@example.com", "--status", "sleeping", code=2)


def test_the_last_active_owner_cannot_be_removed_or_demoted(cli: Cli) -> None:
    cli("member", "create", "root@example.com", "--role", "owner")
    cli("member", "delete", "root@example.com", code=4)
    cli("member", "update", "root@example.com", "--role", "member", code=4)
    assert cli.json("member", "show", "root@example.com")["role"] == "owner"
