"""`bastion server …`: HTTP and stdio servers; updates change only what is given."""

from __future__ import annotations

from tests.cli.conftest import Cli


def test_server_lifecycle_through_the_cli(cli: Cli) -> None:
    http = cli.json("server", "create", "linear", "--url", "https://mcp.linear.app/mcp", "--auth-kind", "bearer")
    assert (http["transport"], http["url"], http["command"], http["auth_kind"]) == (
        "streamable_http",
        "https://mcp.linear.app/mcp",
        None,
        "bearer",
    )
    stdio = cli.json(
        "server", "create", "github", "--command", "npx", "--arg", "-y", "--arg", "@modelcontextprotocol/server-github",
        "--env", "GITHUB_TOOLSETS=repos,issues", "--era", "legacy", "--call-timeout", "120",
    )  # fmt: skip
    assert (stdio["transport"], stdio["command"], stdio["args"], stdio["env"], stdio["era"]) == (
        "stdio",
        "npx",
        ["-y", "@modelcontextprotocol/server-github"],
        {"GITHUB_TOOLSETS": "repos,issues"},
        "legacy",
    )
    assert stdio["call_timeout_s"] == 120.0
    sse = cli.json("server", "create", "events", "--url", "https://events.example.com/sse", "--transport", "sse")
    assert sse["transport"] == "sse"

    assert [s["name"] for s in cli.json("server", "list")] == ["linear", "github", "events"]
    assert [s["name"] for s in cli.json("server", "list", "--transport", "stdio")] == ["github"]
    assert cli.json("server", "show", http["id"])["name"] == "linear"

    updated = cli.json("server", "update", "linear", "--connect-timeout", "2.5", "--description", "Issues")
    assert (updated["connect_timeout_s"], updated["description"], updated["url"], updated["auth_kind"]) == (
        2.5,
        "Issues",
        "https://mcp.linear.app/mcp",
        "bearer",
    )
    assert updated["version"] == 2

    assert cli.json("server", "delete", "events") == {"deleted": True, "id": sse["id"], "name": "events"}
    assert [s["name"] for s in cli.json("server", "list")] == ["linear", "github"]


def test_switching_a_server_between_http_and_stdio_drops_what_the_old_kind_had(cli: Cli) -> None:
    cli("server", "create", "tool", "--url", "https://tool.example.com/mcp")
    stdio = cli.json("server", "update", "tool", "--command", "uvx", "--arg", "tool-mcp")
    assert (stdio["transport"], stdio["url"], stdio["command"], stdio["args"]) == ("stdio", None, "uvx", ["tool-mcp"])
    http = cli.json("server", "update", "tool", "--url", "https://tool.example.com/mcp")
    assert (http["transport"], http["url"], http["command"], http["args"]) == (
        "streamable_http",
        "https://tool.example.com/mcp",
        None,
        [],
    )


def test_oauth_options_make_an_oauth_server(cli: Cli) -> None:
    doc = cli.json(
        "server", "create", "notion", "--url", "https://mcp.notion.example/mcp", "--oauth-registration",
        "pre_registered", "--oauth-client-id", "bastion-client", "--oauth-scope", "read", "--oauth-scope", "write",
    )  # fmt: skip
    assert doc["auth_kind"] == "oauth"
    assert doc["oauth"] == {
        "registration": "pre_registered",
        "client_id": "bastion-client",
        "scopes": ["read", "write"],
        "authorization_server": None,
    }
    plain = cli.json("server", "update", "notion", "--auth-kind", "none")
    assert (plain["auth_kind"], plain["oauth"]) == ("none", None)


def test_server_errors_map_to_exit_codes(cli: Cli) -> None:
    cli("server", "show", "ghost", code=3)
    cli("server", "create", "a", "--url", "https://a.example.com/mcp")
    cli("server", "create", "a", "--url", "https://b.example.com/mcp", code=4)
    cli("server", "create", "b", code=2)
    cli("server", "create", "b", "--url", "https://b.example.com", "--command", "npx", code=2)
    cli("server", "create", "b", "--url", "ftp://b.example.com", code=2)
    cli("server", "create", "b__c", "--url", "https://b.example.com", code=2)
    cli("server", "create", "b", "--command", "npx", "--env", "NOEQUALS", code=2)
    cli("server", "update", "a", code=2)
    cli("gateway", "create", "g", "--server", "a")
    cli("gateway", "create", "h", "--server", "a:other")
    result = cli("server", "delete", "a", code=4)
    assert "cannot delete server 'a': gateways 'g', 'h' use it" in result.stderr


def test_token_env_is_set_on_create_changed_and_cleared_on_update(cli: Cli) -> None:
    created = cli.json(
        "server", "create", "github", "--command", "npx", "--arg", "@modelcontextprotocol/server-github",
        "--auth-kind", "bearer", "--token-env", "GITHUB_PERSONAL_ACCESS_TOKEN",
    )  # fmt: skip
    assert (created["transport"], created["token_env"]) == ("stdio", "GITHUB_PERSONAL_ACCESS_TOKEN")
    kept = cli.json("server", "update", "github", "--description", "GitHub")
    assert kept["token_env"] == "GITHUB_PERSONAL_ACCESS_TOKEN"
    assert cli.json("server", "update", "github", "--token-env", "GH_TOKEN")["token_env"] == "GH_TOKEN"
    cleared = cli.json("server", "update", "github", "--clear-token-env")
    assert (cleared["token_env"], cleared["version"]) == (None, 4)
    assert cli.json("server", "show", "github")["token_env"] is None
    assert cli.json("server", "create", "plain", "--command", "uvx")["token_env"] is None


def test_switching_a_stdio_server_to_http_drops_its_token_env(cli: Cli) -> None:
    cli("server", "create", "tool", "--command", "uvx", "--arg", "tool-mcp", "--token-env", "TOOL_TOKEN")
    http = cli.json("server", "update", "tool", "--url", "https://tool.example.com/mcp")
    assert (http["transport"], http["command"], http["token_env"]) == ("streamable_http", None, None)


def test_a_token_env_that_cannot_carry_the_token_exits_2_naming_the_reason(cli: Cli) -> None:
    http = cli("server", "create", "web", "--url", "https://web.example.com/mcp", "--token-env", "WEB_TOKEN", code=2)
    assert "token_env is for stdio servers" in " ".join(http.stderr.split())
    bad = cli("server", "create", "gh", "--command", "npx", "--token-env", "GITHUB-TOKEN", code=2)
    assert "token_env must be an environment variable name" in " ".join(bad.stderr.split())
    clash = cli("server", "create", "gh", "--command", "npx", "--env", "GH_TOKEN=x", "--token-env", "GH_TOKEN", code=2)
    assert "GH_TOKEN is both token_env and a variable in env" in " ".join(clash.stderr.split())
    assert cli.json("server", "list") == []
    cli("server", "create", "gh", "--command", "npx", "--token-env", "GH_TOKEN")
    cli("server", "update", "gh", "--env", "GH_TOKEN=x", code=4)
    assert cli.json("server", "show", "gh")["env"] == {}
