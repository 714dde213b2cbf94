"""`bastion gateway …`: servers with aliases, identity schemes and provisioning, from options or a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import Cli


@pytest.fixture
def with_servers(cli: Cli) -> Cli:
    cli("server", "create", "github", "--url", "https://api.githubcopilot.com/mcp/")
    cli("server", "create", "linear", "--url", "https://mcp.linear.app/mcp")
    return cli


def test_gateway_lifecycle_through_the_cli(with_servers: Cli) -> None:
    cli = with_servers
    created = cli.json(
        "gateway", "create", "sales", "--name", "Sales", "--server", "github", "--server", "linear:tickets",
        "--server", "github:gh-shared", "--shared", "gh-shared=01a20a62-0000-7000-8000-000000000001",
        "--tools", "tickets=create_issue,list_issues", "--prompts", "github=block_all",
    )  # fmt: skip
    assert (created["slug"], created["name"], created["enabled"], created["url_path"]) == (
        "sales",
        "Sales",
        True,
        "/g/sales/mcp",
    )
    by_alias = {s["alias"]: s for s in created["servers"]}
    assert list(by_alias) == ["github", "tickets", "gh-shared"]
    assert by_alias["tickets"]["server"] == "linear"
    assert by_alias["tickets"]["tools"] == {"mode": "allow_selected", "selected": ["create_issue", "list_issues"]}
    assert by_alias["github"]["prompts"] == {"mode": "block_all", "selected": []}
    assert by_alias["github"]["identity_scheme"] == "per_user"
    assert (by_alias["gh-shared"]["identity_scheme"], by_alias["gh-shared"]["shared_identity_id"]) == (
        "shared",
        "01a20a62-0000-7000-8000-000000000001",
    )

    assert [g["slug"] for g in cli.json("gateway", "list")] == ["sales"]
    assert cli.json("gateway", "show", created["id"])["servers"] == created["servers"]

    edited = cli.json("gateway", "update", "sales", "--disable", "--resources", "tickets=none")
    assert edited["enabled"] is False
    assert {s["alias"]: s["resources"]["mode"] for s in edited["servers"]} == {
        "github": "allow_all",
        "tickets": "block_all",
        "gh-shared": "allow_all",
    }
    assert {s["alias"]: s["tools"]["mode"] for s in edited["servers"]}["tickets"] == "allow_selected"
    replaced = cli.json("gateway", "update", "sales", "--server", "linear", "--enable")
    assert ([s["alias"] for s in replaced["servers"]], replaced["enabled"]) == (["linear"], True)

    assert cli.json("gateway", "delete", "sales")["deleted"] is True
    assert cli.json("gateway", "list") == []


def test_a_gateway_can_be_created_and_updated_from_the_rest_api_json_body(with_servers: Cli, tmp_path: Path) -> None:
    cli = with_servers
    body = {
        "slug": "support",
        "description": "Support desk",
        "servers": [
            {"server": "github", "tools": {"mode": "allow_selected", "selected": ["search_issues"]}},
            {"server": "linear", "alias": "tickets", "identity_scheme": "per_user"},
        ],
    }
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    created = cli.json("gateway", "create", "--file", str(path))
    assert (created["slug"], created["description"]) == ("support", "Support desk")
    assert [(s["alias"], s["tools"]["mode"]) for s in created["servers"]] == [
        ("github", "allow_selected"),
        ("tickets", "allow_all"),
    ]
    # The SLUG argument wins over the file, and --server adds to the file's list.
    other = cli.json("gateway", "create", "support-2", "--file", str(path), "--server", "github:gh2")
    assert (other["slug"], [s["alias"] for s in other["servers"]]) == ("support-2", ["github", "tickets", "gh2"])

    patch = tmp_path / "patch.json"
    patch.write_text(json.dumps({"name": "Support Desk", "servers": [{"server": "linear"}]}), encoding="utf-8")
    updated = cli.json("gateway", "update", "support", "--file", str(patch))
    assert (updated["name"], [s["alias"] for s in updated["servers"]]) == ("Support Desk", ["linear"])


def test_gateway_errors_map_to_exit_codes(with_servers: Cli, tmp_path: Path) -> None:
    cli = with_servers
    cli("gateway", "show", "ghost", code=3)
    result = cli("gateway", "create", "g", "--server", "nope", code=3)
    assert "no server named 'nope'" in result.stderr
    cli("gateway", "create", "g", "--server", "github")
    cli("gateway", "create", "g", code=4)
    cli("gateway", "create", code=2)
    cli("gateway", "create", "h", "--server", "github", "--server", "github", code=2)
    cli("gateway", "create", "h", "--server", "github", "--tools", "linear=all", code=2)
    cli("gateway", "update", "g", code=2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"slug": "x", "colour": "blue"}), encoding="utf-8")
    assert "colour" in cli("gateway", "create", "--file", str(bad), code=2).stderr
    bad.write_text("{not json", encoding="utf-8")
    cli("gateway", "create", "--file", str(bad), code=2)
    cli("gateway", "create", "--file", str(tmp_path / "missing.json"), code=2)
