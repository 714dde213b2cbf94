"""`bastion policy|content-rule|rate-limit …`: rules are added, listed, switched and removed from the shell."""

from __future__ import annotations

import pytest

from tests.cli.conftest import Cli


@pytest.fixture
def gateway(cli: Cli) -> str:
    cli("server", "create", "github", "--url", "https://api.githubcopilot.com/mcp/")
    created = cli.json("gateway", "create", "sales", "--server", "github:gh")
    return str(created["id"])


def test_a_policy_rule_round_trips_through_add_list_and_remove(cli: Cli, gateway: str) -> None:
    rule = cli.json(
        "policy", "add", "--effect", "deny", "--subject-kind", "member", "--subject", "ada@example.com",
        "--gateway", "sales", "--server", "gh", "--name", "drop_*", "--description", "no drops",
    )  # fmt: skip
    assert (rule["effect"], rule["subject"], rule["gateway_id"], rule["gateway"]) == (
        "deny",
        "ada@example.com",
        gateway,
        "sales",
    )
    assert [r["id"] for r in cli.json("policy", "list")] == [rule["id"]]
    assert cli.json("policy", "show", rule["id"])["summary"] == rule["summary"]
    table = cli("policy", "list").stdout
    assert "ada@example.com" in table

    assert cli.json("policy", "remove", rule["id"]) == {"deleted": True, "id": rule["id"]}
    assert cli.json("policy", "list") == []
    cli("policy", "remove", rule["id"], code=3)


def test_a_policy_rule_for_a_server_the_gateway_lacks_is_refused_readably(cli: Cli, gateway: str) -> None:
    result = cli("policy", "add", "--effect", "deny", "--gateway", "sales", "--server", "github", code=3)
    assert "no server with alias 'github'" in result.stderr and "(field: server)" in result.stderr
    cli("policy", "add", "--effect", "perhaps", code=2)


def test_a_content_rule_round_trips_and_can_be_switched_off_and_on_by_name(cli: Cli, gateway: str) -> None:
    rule = cli.json(
        "content-rule", "add", "cards", "--pattern", r"\d{16}", "--action", "mask", "--target", "results",
        "--gateway", "sales",
    )  # fmt: skip
    assert (rule["name"], rule["action"], rule["target"], rule["gateway"], rule["enabled"]) == (
        "cards",
        "mask",
        "results",
        "sales",
        True,
    )
    assert [r["name"] for r in cli.json("content-rule", "list")] == ["cards"]
    assert cli.json("content-rule", "disable", "cards")["enabled"] is False
    assert cli.json("content-rule", "show", rule["id"])["enabled"] is False
    assert cli.json("content-rule", "enable", rule["id"])["enabled"] is True
    updated = cli.json("content-rule", "update", "cards", "--action", "replace", "--replacement", "<card>")
    assert (updated["action"], updated["replacement"]) == ("replace", "<card>")
    assert "cards" in cli("content-rule", "list").stdout

    assert cli.json("content-rule", "remove", "cards") == {"deleted": True, "id": rule["id"], "name": "cards"}
    assert cli.json("content-rule", "list") == []
    cli("content-rule", "show", "cards", code=3)


def test_a_bad_regular_expression_is_refused_with_a_readable_error(cli: Cli) -> None:
    result = cli("content-rule", "add", "cards", "--pattern", "([0-9]", "--action", "redact", code=2)
    assert "error [validation_failed] pattern is not a valid regular expression" in result.stderr
    assert "(field: pattern)" in result.stderr and "Traceback" not in result.stderr
    result = cli("content-rule", "add", "swap", "--pattern", "x+", "--action", "replace", code=2)
    assert "needs the replacement text" in result.stderr
    cli("content-rule", "add", "keys", "--pattern", "sk-[a-z]+", "--action", "block")
    cli("content-rule", "add", "keys", "--pattern", "x+", "--action", "block", code=4)
    cli("content-rule", "update", "keys", code=2)
    assert cli.json("content-rule", "list")[0]["pattern"] == "sk-[a-z]+"


def test_a_rate_limit_round_trips_through_add_list_and_remove(cli: Cli, gateway: str) -> None:
    limit = cli.json(
        "rate-limit", "add", "--per", "member", "--limit", "100/minute", "--strategy", "sliding",
        "--gateway", "sales", "--tool", "gh__*",
    )  # fmt: skip
    assert (limit["amount"], limit["window_s"], limit["strategy"], limit["name"], limit["gateway"]) == (
        100,
        60,
        "sliding",
        "gh__*",
        "sales",
    )
    assert [r["id"] for r in cli.json("rate-limit", "list")] == [limit["id"]]
    assert "100/minute" in cli("rate-limit", "list").stdout
    assert cli.json("rate-limit", "remove", limit["id"]) == {"deleted": True, "id": limit["id"]}
    assert cli.json("rate-limit", "list") == []


def test_a_bad_limit_text_is_refused_naming_the_option(cli: Cli) -> None:
    result = cli("rate-limit", "add", "--per", "member", "--limit", "lots", code=2)
    assert "is not a rate limit" in result.stderr and "(field: limit)" in result.stderr
    cli("rate-limit", "add", "--per", "member", "--limit", "10/minute", "--gateway", "nowhere", code=3)
    assert cli.json("rate-limit", "list") == []
