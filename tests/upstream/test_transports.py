"""A stdio server gets the person's credential in its environment, under the variable it reads it from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from mcp.client.stdio import StdioServerParameters

from bastion.domain.identities import IdentitySecret, bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Server, Transport
from bastion.net.outbound import OutboundPolicy
from bastion.types import ServerId, WorkspaceId
from bastion.upstream import transports
from bastion.upstream.transports import STDIO_TOKEN_ENV, Credential

TOKEN = "ghp_PersonToken0123456789abcdefghijklmn"


def _stdio_server(token_env: str | None) -> Server:
    now = datetime.now(UTC)
    return Server(
        id=ServerId("srv_github"),
        workspace_id=WorkspaceId("ws"),
        name="github",
        description="",
        transport=Transport.STDIO,
        url=None,
        command="npx",
        args=("-y", "@modelcontextprotocol/server-github"),
        env={"GITHUB_TOOLSETS": "repos"},
        auth_kind=AuthKind.BEARER,
        oauth=None,
        era=ProtocolEra.AUTO,
        connect_timeout_s=5.0,
        call_timeout_s=60.0,
        version=1,
        created_at=now,
        updated_at=now,
        token_env=token_env,
    )


def test_the_token_goes_in_bastion_bearer_token_by_default() -> None:
    assert Credential("id", bearer_secret(TOKEN)).environment() == {STDIO_TOKEN_ENV: TOKEN}
    assert STDIO_TOKEN_ENV == "BASTION_BEARER_TOKEN"


def test_the_token_goes_only_in_the_variable_the_server_names() -> None:
    env = Credential("id", bearer_secret(TOKEN)).environment("GITHUB_PERSONAL_ACCESS_TOKEN")
    assert env == {"GITHUB_PERSONAL_ACCESS_TOKEN": TOKEN}


def test_an_oauth_access_token_goes_in_the_named_variable_too() -> None:
    secret = IdentitySecret(access_token="at-123", refresh_token="rt-456")
    assert Credential("id", secret).environment("LINEAR_TOKEN") == {"LINEAR_TOKEN": "at-123"}


def test_a_header_set_identity_and_no_identity_name_no_token_variable() -> None:
    headers = Credential("id", bearer_secret(headers={"X_API_KEY": "k"}))
    assert headers.environment("GITHUB_PERSONAL_ACCESS_TOKEN") == {"X_API_KEY": "k"}
    assert Credential(None).environment("GITHUB_PERSONAL_ACCESS_TOKEN") == {}


@pytest.mark.parametrize(
    ("token_env", "expected"),
    [(None, STDIO_TOKEN_ENV), ("GITHUB_PERSONAL_ACCESS_TOKEN", "GITHUB_PERSONAL_ACCESS_TOKEN")],
)
def test_the_stdio_command_is_started_with_the_server_s_env_and_the_token_where_it_reads_it(
    monkeypatch: pytest.MonkeyPatch, token_env: str | None, expected: str
) -> None:
    started: list[StdioServerParameters] = []

    def capture(params: StdioServerParameters, **_: Any) -> Any:
        started.append(params)
        return None

    monkeypatch.setattr(transports, "stdio_client", capture)
    transports.open_transport(_stdio_server(token_env), Credential("id", bearer_secret(TOKEN)), OutboundPolicy())
    assert [p.env for p in started] == [{"GITHUB_TOOLSETS": "repos", expected: TOKEN}]


def test_header_names_that_would_change_what_the_command_runs_never_reach_its_environment() -> None:
    headers = {"X-Api-Key": "k-1", "LD_PRELOAD": "/tmp/evil.so", "NODE_OPTIONS": "--require /tmp/x.js", "path": "/x"}
    secret = IdentitySecret(headers=headers)
    assert Credential("id", secret).environment() == {"X-Api-Key": "k-1"}
