"""Reading Claude Desktop, Cursor and VS Code configs: what becomes a server, what is skipped, what is left out."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.domain import credentials, importing, naming
from bastion.domain.importing import ImportPlan, Note, Renamed, SecretLeftOut, Skipped
from bastion.domain.models import AuthKind, Transport
from bastion.domain.specs import ServerSpec
from bastion.errors import ValidationFailed

FIXTURES = Path(__file__).parent.parent / "fixtures" / "import"

# Every credential planted in the fixtures. None of them may survive into a plan.
CANARIES = (
    "ghp_CanaryGithub0123456789abcdefghijklmn",
    "CanaryPgPass42",
    "xoxb-1111111111-2222222222-CanarySlackBotToken",
    "BSACanaryBrave0000000000",
    "CanaryAcmeRemoteToken77",
    "CanaryWeatherKey31",
    "Q7vZ2kLm9XpR4tWn8YbC3dFh6JsA",
    "ctx7sk-CanaryContext7-5f0e",
    "CanaryInternalBearer9",
    "sk_test_CanaryStripe51HfX2",
    "sk-ak-CanaryZapierPath8x7",
    "${input:github-pat}",
    "${input:perplexity-key}",
    "${env:NOTES_TOKEN}",
)
UNKNOWN_TYPES = "(known: http, streamable-http, streamableHttp, streamable_http, sse, stdio)"


def plan_of(name: str) -> ImportPlan:
    return importing.parse((FIXTURES / name).read_text(encoding="utf-8"))


def by_name(plan: ImportPlan) -> dict[str, ServerSpec]:
    return {s.name: s for s in plan.servers}


def assert_no_canary(plan: ImportPlan) -> None:
    text = repr(plan)
    leaked = [c for c in CANARIES if c in text]
    assert not leaked, f"secrets reached the plan: {leaked}"


def test_claude_desktop_stdio_servers_are_planned_without_their_tokens() -> None:
    plan = plan_of("claude_desktop_config.json")
    servers = by_name(plan)
    assert list(servers) == [
        "filesystem",
        "github",
        "postgres",
        "slack",
        "brave-search",
        "acme-remote",
        "weather",
    ]
    assert servers["filesystem"] == ServerSpec(
        "filesystem",
        Transport.STDIO,
        command="npx",
        args=("-y", "@modelcontextprotocol/server-filesystem", "/Users/alice/Desktop", "/Users/alice/Downloads"),
        env={},
    )
    assert servers["github"].env == {"GITHUB_TOOLSETS": "repos,issues,pull_requests"}
    assert servers["github"].auth_kind is AuthKind.BEARER
    assert servers["slack"].env == {"SLACK_TEAM_ID": "T01234567"}
    # The connection string carried a password: the whole argument goes, the rest of the command stays.
    assert servers["postgres"].args == ("-y", "@modelcontextprotocol/server-postgres")
    # "--header 'Authorization: Bearer …'" and "--api-key VALUE": the flag goes with its value.
    assert servers["acme-remote"].args == ("mcp-remote", "https://mcp.acme.example/sse")
    assert servers["weather"].args == ("mcp-weather",)
    # A long random value is a credential whatever its variable is called.
    assert servers["weather"].env == {"UNITS": "metric"}
    assert servers["filesystem"].auth_kind is AuthKind.NONE
    assert plan.skipped == ()
    assert plan.renamed == (Renamed("brave search", "brave-search"),)
    assert set(plan.secrets_left_out) == {
        SecretLeftOut("github", "env.GITHUB_PERSONAL_ACCESS_TOKEN"),
        SecretLeftOut("postgres", "args[2]"),
        SecretLeftOut("slack", "env.SLACK_BOT_TOKEN"),
        SecretLeftOut("brave-search", "env.BRAVE_API_KEY"),
        SecretLeftOut("acme-remote", "args[3]"),
        SecretLeftOut("acme-remote", "env.AUTH_TOKEN"),
        SecretLeftOut("weather", "args[2]"),
        SecretLeftOut("weather", "env.WORKSPACE_HANDLE"),
    }
    assert_no_canary(plan)


def test_cursor_url_servers_lose_credential_headers_and_query_and_become_bearer() -> None:
    plan = plan_of("cursor_mcp.json")
    servers = by_name(plan)
    assert list(servers) == ["linear", "context7", "internal-tools", "stripe", "local-tool"]
    assert servers["linear"] == ServerSpec(
        "linear", Transport.STREAMABLE_HTTP, url="https://mcp.linear.app/sse", env={}
    )
    assert servers["context7"].auth_kind is AuthKind.BEARER
    assert servers["internal-tools"].auth_kind is AuthKind.BEARER
    assert servers["stripe"].url == "https://mcp.stripe.example/mcp?region=eu"
    assert servers["stripe"].auth_kind is AuthKind.BEARER
    assert servers["local-tool"].env == {"API_BASE": "https://api.example.com"}
    assert servers["local-tool"].auth_kind is AuthKind.NONE
    assert [s.name for s in plan.skipped] == ["zapier"]
    assert "credential in the path" in plan.skipped[0].reason
    assert set(plan.secrets_left_out) == {
        SecretLeftOut("context7", "headers.CONTEXT7_API_KEY"),
        SecretLeftOut("internal-tools", "headers.Authorization"),
        SecretLeftOut("stripe", "url?api_key"),
    }
    assert [(n.server, n.message) for n in plan.notes] == [
        ("internal-tools", "header X-Team not imported: servers carry no custom headers yet")
    ]
    assert_no_canary(plan)


def test_vscode_mcp_json_with_comments_types_and_inputs_is_read() -> None:
    plan = plan_of("vscode_mcp.json")
    servers = by_name(plan)
    assert {name: s.transport for name, s in servers.items()} == {
        "github": Transport.STREAMABLE_HTTP,
        "fetch": Transport.STDIO,
        "events": Transport.SSE,
        "perplexity": Transport.STDIO,
        "memory": Transport.STREAMABLE_HTTP,
        "notes": Transport.STREAMABLE_HTTP,
    }
    assert servers["github"].url == "https://api.githubcopilot.com/mcp/"
    assert servers["github"].auth_kind is AuthKind.BEARER
    assert servers["perplexity"].env == {}
    assert servers["perplexity"].auth_kind is AuthKind.BEARER
    assert servers["fetch"].args == ("mcp-server-fetch",)
    assert plan.skipped == (Skipped("socket", f"unknown transport type 'websocket' {UNKNOWN_TYPES}"),)
    assert set(plan.secrets_left_out) == {
        SecretLeftOut("github", "headers.Authorization"),
        SecretLeftOut("perplexity", "env.PERPLEXITY_API_KEY"),
    }
    assert_no_canary(plan)


def test_vscode_settings_mcp_block_is_read_and_a_spaced_name_is_renamed() -> None:
    plan = plan_of("vscode_settings.json")
    servers = by_name(plan)
    assert list(servers) == ["My-Notes-Server", "docs"]
    assert servers["My-Notes-Server"].env == {"NOTES_DIR": "/home/alice/notes"}
    assert servers["My-Notes-Server"].auth_kind is AuthKind.BEARER
    assert servers["docs"].transport is Transport.STREAMABLE_HTTP
    assert plan.renamed == (Renamed("My Notes Server", "My-Notes-Server"),)
    assert plan.secrets_left_out == (SecretLeftOut("My-Notes-Server", "env.NOTES_TOKEN"),)
    assert_no_canary(plan)


def test_invalid_json_is_refused_with_its_position() -> None:
    with pytest.raises(ValidationFailed, match=r"not valid JSON: .* at line \d+ column \d+"):
        plan_of("invalid.json")


def test_unknown_types_and_malformed_entries_are_skipped_with_reasons() -> None:
    plan = plan_of("unknown_type.json")
    assert [s.name for s in plan.servers] == ["plain"]
    assert plan.skipped == (
        Skipped("socket", f"unknown transport type 'websocket' {UNKNOWN_TYPES}"),
        Skipped("grpc", f"unknown transport type 'grpc' {UNKNOWN_TYPES}"),
        Skipped("broken", "the entry is not an object"),
        Skipped("empty", 'has neither a "command" nor a "url"'),
        Skipped("__", "the name has no letters or digits to make a server name from"),
    )


@pytest.mark.parametrize(
    ("declared", "transport"),
    [
        ("http", Transport.STREAMABLE_HTTP),
        ("streamable-http", Transport.STREAMABLE_HTTP),
        ("streamableHttp", Transport.STREAMABLE_HTTP),
        ("streamable_http", Transport.STREAMABLE_HTTP),
        ("sse", Transport.SSE),
        ("SSE", Transport.SSE),
    ],
)
def test_every_spelling_of_the_http_transports_is_accepted(declared: str, transport: Transport) -> None:
    plan = importing.plan({"servers": {"s": {"type": declared, "url": "https://s.example.com/mcp"}}})
    assert [(s.name, s.transport) for s in plan.servers] == [("s", transport)]


def test_a_url_without_a_type_is_streamable_http_and_a_command_is_stdio() -> None:
    plan = importing.parse('{"mcpServers": {"a": {"url": "https://a.example.com/mcp"}, "b": {"command": "uvx"}}}')
    assert [(s.name, s.transport) for s in plan.servers] == [("a", Transport.STREAMABLE_HTTP), ("b", Transport.STDIO)]


def test_a_stdio_type_without_a_command_is_skipped() -> None:
    plan = importing.parse('{"servers": {"x": {"type": "stdio", "url": "https://x.example.com"}}}')
    assert plan.servers == ()
    assert plan.skipped == (Skipped("x", 'a stdio server needs a "command"'),)


def test_two_entries_that_sanitize_to_the_same_name_keep_only_the_first() -> None:
    plan = importing.parse('{"mcpServers": {"my server": {"command": "a"}, "my-server": {"command": "b"}}}')
    assert [(s.name, s.command) for s in plan.servers] == [("my-server", "a")]
    assert plan.skipped == (Skipped("my-server", "another entry ('my server') already takes the name 'my-server'"),)


def test_a_file_without_any_server_map_is_refused() -> None:
    with pytest.raises(ValidationFailed, match="no MCP servers found"):
        importing.parse('{"editor.fontSize": 14}')
    with pytest.raises(ValidationFailed, match="JSON object"):
        importing.parse("[1, 2]")


def test_a_url_with_a_password_is_skipped_not_stored() -> None:
    plan = importing.parse('{"mcpServers": {"db": {"url": "https://admin:Hunter2Pass@db.example.com/mcp"}}}')
    assert plan.servers == ()
    assert "user name or password" in plan.skipped[0].reason
    assert "Hunter2Pass" not in repr(plan)


def test_a_credential_in_the_command_line_itself_skips_the_server() -> None:
    plan = importing.parse('{"mcpServers": {"x": {"command": "run --token=ghp_CanaryInCommand1234567890"}}}')
    assert plan.servers == ()
    assert "ghp_CanaryInCommand" not in repr(plan)


@given(st.text(max_size=100))
def test_sanitized_names_are_always_valid_server_names(raw: str) -> None:
    name = importing.sanitize_name(raw)
    if name is not None:
        assert naming.server_name(name) == name


@given(
    st.sampled_from(["GITHUB_TOKEN", "OPENAI_API_KEY", "DB_PASSWORD", "CLIENT_SECRET", "GITLAB_PAT", "AUTH"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
)
def test_a_secret_named_env_var_never_reaches_the_plan(name: str, value: str) -> None:
    plan = importing.plan({"mcpServers": {"s": {"command": "npx", "env": {name: value}}}})
    assert all(name not in spec.env for spec in plan.servers)
    assert plan.secrets_left_out == (SecretLeftOut("s", f"env.{name}"),)


@pytest.mark.parametrize(
    "value",
    [
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
        "gho_abcdefghijklmnopqrstuvwxyz0123456789",
        "sk-proj-abcdefghijklmnopqrstuvwxyz",
        "xoxp-1234567890-abcdefghijkl",
        "glpat-abcdefghijklmnopqrst",
        "AKIAIOSFODNN7EXAMPLE",
        "Bearer abc.def.ghi-jkl",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
        "0123456789abcdef0123456789abcdef",
        "${input:token}",
    ],
)
def test_credential_shaped_values_are_recognised_under_any_name(value: str) -> None:
    assert credentials.credential_value(value)


@pytest.mark.parametrize(
    "value",
    ["debug", "/Users/alice/Projects", "@modelcontextprotocol/server-github", "repos,issues", "T01234567", "metric"],
)
def test_ordinary_config_values_are_kept(value: str) -> None:
    assert not credentials.credential_value(value)


def test_numbers_and_booleans_in_env_are_kept_as_the_client_would_pass_them() -> None:
    plan = importing.plan({"mcpServers": {"s": {"command": "x", "env": {"DEBUG": True, "PORT": 8080}}}})
    assert plan.servers[0].env == {"DEBUG": "true", "PORT": "8080"}
    skipped = importing.plan({"mcpServers": {"s": {"command": "x", "env": {"OPTS": {"a": 1}}}}})
    assert skipped.skipped == (Skipped("s", "env.OPTS must be a string"),)


def test_a_connection_string_with_a_password_and_query_is_left_out_of_the_args() -> None:
    db = "postgresql://app:CanaryQueryPass9@db.example.com/app?sslmode=require"
    plan = importing.plan({"mcpServers": {"pg": {"command": "npx", "args": ["server-postgres", db]}}})
    assert plan.servers[0].args == ("server-postgres",)
    assert plan.secrets_left_out == (SecretLeftOut("pg", "args[1]"),)


def test_the_one_secret_variable_of_a_stdio_server_becomes_where_each_person_s_token_goes() -> None:
    plan = plan_of("claude_desktop_config.json")
    servers = by_name(plan)
    assert {name: s.token_env for name, s in servers.items()} == {
        "filesystem": None,
        "github": "GITHUB_PERSONAL_ACCESS_TOKEN",
        "postgres": None,  # its secret was an argument, not a variable
        "slack": "SLACK_BOT_TOKEN",
        "brave-search": "BRAVE_API_KEY",
        "acme-remote": "AUTH_TOKEN",
        "weather": "WORKSPACE_HANDLE",
    }
    # The name is kept, the value is not: the secret stays out of env and is still reported as left out.
    assert "GITHUB_PERSONAL_ACCESS_TOKEN" not in servers["github"].env
    assert SecretLeftOut("github", "env.GITHUB_PERSONAL_ACCESS_TOKEN") in plan.secrets_left_out
    assert Note("github", "GITHUB_PERSONAL_ACCESS_TOKEN will carry each person's token (token_env)") in plan.notes
    assert not [n for n in plan.notes if n.server in ("filesystem", "postgres")]
    assert by_name(plan_of("vscode_mcp.json"))["perplexity"].token_env == "PERPLEXITY_API_KEY"
    assert by_name(plan_of("vscode_settings.json"))["My-Notes-Server"].token_env == "NOTES_TOKEN"
    assert_no_canary(plan)


def test_with_several_secret_variables_none_is_guessed_to_be_the_person_s_token() -> None:
    env = {"GITLAB_TOKEN": "glpat-abcdefghijklmnopqrst", "GITLAB_WEBHOOK_SECRET": "s3cr3t", "GITLAB_URL": "x"}
    plan = importing.plan({"mcpServers": {"gitlab": {"command": "npx", "env": env}}})
    (spec,) = plan.servers
    assert (spec.token_env, spec.env, spec.auth_kind) == (None, {"GITLAB_URL": "x"}, AuthKind.BEARER)
    assert plan.secrets_left_out == (
        SecretLeftOut("gitlab", "env.GITLAB_TOKEN"),
        SecretLeftOut("gitlab", "env.GITLAB_WEBHOOK_SECRET"),
    )
    assert plan.notes == ()


def test_a_secret_variable_whose_name_cannot_carry_a_token_is_left_out_without_token_env() -> None:
    plan = importing.plan({"mcpServers": {"s": {"command": "npx", "env": {"api-key": "ghp_abcdefghij0123456789xyz"}}}})
    (spec,) = plan.servers
    assert (spec.name, spec.token_env, spec.env) == ("s", None, {})
    assert plan.secrets_left_out == (SecretLeftOut("s", "env.api-key"),)


def test_an_http_server_s_secret_header_sets_no_token_env() -> None:
    servers = by_name(plan_of("cursor_mcp.json"))
    assert all(s.token_env is None for s in servers.values())
