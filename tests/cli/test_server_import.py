"""`bastion server import`: real client configs become servers; secrets never reach the database or the screen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli.conftest import Cli, dump_table
from tests.domain.test_importing import CANARIES, FIXTURES

CONFIGS = ("claude_desktop_config.json", "cursor_mcp.json", "vscode_mcp.json", "vscode_settings.json")


def assert_nothing_leaked(*texts: str) -> None:
    leaked = [c for c in CANARIES if any(c in t for t in texts)]
    assert not leaked, f"secrets leaked: {leaked}"


def test_claude_desktop_import_creates_servers_and_reports_secrets_by_place_only(cli: Cli, db_url: str) -> None:
    result = cli("server", "import", str(FIXTURES / "claude_desktop_config.json"), "--json")
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is False
    assert [c["name"] for c in doc["created"]] == [
        "filesystem",
        "github",
        "postgres",
        "slack",
        "brave-search",
        "acme-remote",
        "weather",
    ]
    assert all(c["id"] for c in doc["created"])
    assert doc["skipped"] == []
    assert doc["renamed"] == [{"from": "brave search", "to": "brave-search"}]
    assert {"server": "github", "where": "env.GITHUB_PERSONAL_ACCESS_TOKEN"} in [
        {"server": s["server"], "where": s["where"]} for s in doc["secrets_left_out"]
    ]
    assert all(s["hint"].startswith("secret left out") for s in doc["secrets_left_out"])
    stored = {s["name"]: s for s in cli.json("server", "list")}
    assert stored["github"]["env"] == {"GITHUB_TOOLSETS": "repos,issues,pull_requests"}
    assert stored["github"]["auth_kind"] == "bearer"
    assert stored["filesystem"]["auth_kind"] == "none"
    assert_nothing_leaked(result.stdout, result.stderr, dump_table(db_url, "servers"))


@pytest.mark.parametrize("config", CONFIGS)
def test_no_planted_secret_reaches_the_servers_table_or_any_output(cli: Cli, db_url: str, config: str) -> None:
    table = cli("server", "import", str(FIXTURES / config))
    as_json = cli("server", "import", str(FIXTURES / config), "--json")
    listed = cli("server", "list", "--json")
    assert "Secrets left out" in table.stdout
    assert_nothing_leaked(
        table.stdout, table.stderr, as_json.stdout, as_json.stderr, listed.stdout, dump_table(db_url, "servers")
    )


def test_importing_again_skips_existing_names_and_never_overwrites_them(cli: Cli) -> None:
    cli("server", "create", "linear", "--url", "https://linear.internal.example/mcp", "--description", "ours")
    first = cli.json("server", "import", str(FIXTURES / "cursor_mcp.json"))
    assert [c["name"] for c in first["created"]] == ["context7", "internal-tools", "stripe", "local-tool"]
    assert {"name": "linear", "reason": "already exists"} in first["skipped"]
    assert {s["server"] for s in first["secrets_left_out"]} == {"context7", "internal-tools", "stripe"}
    linear = cli.json("server", "show", "linear")
    assert (linear["url"], linear["description"], linear["version"]) == (
        "https://linear.internal.example/mcp",
        "ours",
        1,
    )

    again = cli.json("server", "import", str(FIXTURES / "cursor_mcp.json"))
    assert again["created"] == []
    assert sorted((s["name"], s["reason"]) for s in again["skipped"]) == [
        ("context7", "already exists"),
        ("internal-tools", "already exists"),
        ("linear", "already exists"),
        ("local-tool", "already exists"),
        ("stripe", "already exists"),
        ("zapier", "its url carries a credential in the path; add the server by hand once identities exist"),
    ]
    assert len(cli.json("server", "list")) == 5


def test_a_dry_run_reports_the_plan_and_creates_nothing(cli: Cli) -> None:
    cli("server", "create", "fetch", "--command", "uvx", "--arg", "mcp-server-fetch")
    doc = cli.json("server", "import", str(FIXTURES / "vscode_mcp.json"), "--dry-run")
    assert doc["dry_run"] is True
    assert [c["name"] for c in doc["created"]] == ["github", "events", "perplexity", "memory", "notes"]
    assert all(c["id"] is None for c in doc["created"])
    assert {"name": "fetch", "reason": "already exists"} in doc["skipped"]
    assert [s["name"] for s in cli.json("server", "list")] == ["fetch"]
    table = cli("server", "import", str(FIXTURES / "vscode_mcp.json"), "--dry-run")
    assert "Would create" in table.stdout


def test_unknown_types_are_skipped_and_the_rest_imported(cli: Cli) -> None:
    doc = cli.json("server", "import", str(FIXTURES / "unknown_type.json"))
    assert [c["name"] for c in doc["created"]] == ["plain"]
    assert [s["name"] for s in doc["skipped"]] == ["socket", "grpc", "broken", "empty", "__"]


def test_a_file_that_is_not_json_or_not_there_exits_2(cli: Cli, tmp_path: Path) -> None:
    result = cli("server", "import", str(FIXTURES / "invalid.json"), code=2)
    assert "not valid JSON" in result.stderr
    cli("server", "import", str(tmp_path / "missing.json"), code=2)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cli("server", "import", str(binary), code=2)
    assert cli.json("server", "list") == []


def test_the_import_reads_a_file_by_any_name(cli: Cli, tmp_path: Path) -> None:
    copy = tmp_path / "settings.json"
    shutil.copy(FIXTURES / "vscode_settings.json", copy)
    doc = cli.json("server", "import", str(copy))
    assert [c["name"] for c in doc["created"]] == ["My-Notes-Server", "docs"]


def test_the_import_report_and_the_stored_server_name_the_variable_that_carries_each_person_s_token(cli: Cli) -> None:
    doc = cli.json("server", "import", str(FIXTURES / "claude_desktop_config.json"))
    created = {c["name"]: c for c in doc["created"]}
    assert created["github"]["token_env"] == "GITHUB_PERSONAL_ACCESS_TOKEN"
    assert created["filesystem"]["token_env"] is None
    assert {
        "server": "github",
        "message": "GITHUB_PERSONAL_ACCESS_TOKEN will carry each person's token (token_env)",
    } in (doc["notes"])
    stored = cli.json("server", "show", "github")
    assert (stored["token_env"], stored["env"]) == (
        "GITHUB_PERSONAL_ACCESS_TOKEN",
        {"GITHUB_TOOLSETS": "repos,issues,pull_requests"},
    )
    table = cli("server", "import", str(FIXTURES / "vscode_settings.json"))
    assert "NOTES_TOKEN will carry each person's token" in " ".join(table.stdout.split())
