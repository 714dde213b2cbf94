"""`bastion host …`: hosts are created, edited, disabled and re-enabled without losing anything."""

from __future__ import annotations

from tests.cli.conftest import Cli


def test_host_lifecycle_through_the_cli(cli: Cli) -> None:
    created = cli.json("host", "create", "sales-agent", "--description", "Sales bot")
    assert (created["name"], created["enabled"], created["webhook_url"]) == ("sales-agent", True, None)
    cli("host", "create", "support-agent")
    assert [h["name"] for h in cli.json("host", "list")] == ["sales-agent", "support-agent"]
    assert cli.json("host", "show", created["id"])["description"] == "Sales bot"

    updated = cli.json("host", "update", "sales-agent", "--webhook-url", "https://agent.example.com/hooks")
    assert (updated["webhook_url"], updated["description"], updated["version"]) == (
        "https://agent.example.com/hooks",
        "Sales bot",
        2,
    )
    cleared = cli.json("host", "update", "sales-agent", "--webhook-url", "")
    assert cleared["webhook_url"] is None

    assert cli.json("host", "delete", "support-agent")["deleted"] is True
    assert [h["name"] for h in cli.json("host", "list")] == ["sales-agent"]


def test_disabling_a_host_keeps_it_and_enabling_restores_it(cli: Cli) -> None:
    created = cli.json("host", "create", "sales-agent")
    disabled = cli.json("host", "disable", "sales-agent")
    assert disabled["id"] == created["id"]
    assert disabled["enabled"] is False
    assert disabled["disabled_at"] is not None
    assert [(h["name"], h["enabled"]) for h in cli.json("host", "list")] == [("sales-agent", False)]
    assert [h["name"] for h in cli.json("host", "list", "--disabled")] == ["sales-agent"]
    assert cli.json("host", "list", "--enabled") == []

    enabled = cli.json("host", "enable", "sales-agent")
    assert (enabled["id"], enabled["enabled"], enabled["disabled_at"]) == (created["id"], True, None)
    assert cli("host", "disable", "sales-agent").stderr.count("its tokens were kept") == 1


def test_host_errors_map_to_exit_codes(cli: Cli) -> None:
    cli("host", "show", "ghost", code=3)
    cli("host", "disable", "ghost", code=3)
    cli("host", "create", "sales-agent")
    cli("host", "create", "sales-agent", code=4)
    cli("host", "create", "Not A Slug", code=2)
    cli("host", "update", "sales-agent", "--webhook-url", "ftp://example.com", code=2)
    cli("host", "update", "sales-agent", code=2)
