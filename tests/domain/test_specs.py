"""What makes a server spec valid: the variable a stdio server reads each person's token from."""

from __future__ import annotations

import pytest

from bastion.domain.models import Transport
from bastion.domain.specs import ServerSpec, apply_changes
from bastion.errors import ValidationFailed

STDIO = ServerSpec("github", Transport.STDIO, command="npx", args=("-y", "@modelcontextprotocol/server-github"))


def refusal(spec: ServerSpec) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        spec.validated()
    return caught.value


@pytest.mark.parametrize("name", ["GITHUB_PERSONAL_ACCESS_TOKEN", "_token", "a", "X" * 64, "BASTION_BEARER_TOKEN"])
def test_a_stdio_server_may_name_the_variable_its_token_goes_in(name: str) -> None:
    assert apply_changes(STDIO, {"token_env": name}).validated().token_env == name


def test_no_token_env_means_the_default_variable() -> None:
    assert STDIO.validated().token_env is None


@pytest.mark.parametrize("transport", [Transport.STREAMABLE_HTTP, Transport.SSE])
def test_an_http_server_has_no_token_env(transport: Transport) -> None:
    spec = ServerSpec("github", transport, url="https://mcp.github.example/", token_env="GITHUB_TOKEN")
    error = refusal(spec)
    assert error.field == "token_env"
    assert "stdio" in error.detail


@pytest.mark.parametrize(
    "name", ["", "1TOKEN", "GITHUB-TOKEN", "MY TOKEN", "TOKEN=x", "TÖKEN", "X" * 65, "TOKEN\x00", "$TOKEN"]
)
def test_a_token_env_that_is_not_a_variable_name_is_refused(name: str) -> None:
    error = refusal(apply_changes(STDIO, {"token_env": name}))
    assert error.field == "token_env"
    assert "environment variable name" in error.detail


@pytest.mark.parametrize("name", ["PATH", "LD_PRELOAD", "DYLD_INSERT_LIBRARIES", "NODE_OPTIONS", "PYTHONPATH", "path"])
def test_a_variable_that_decides_what_the_command_runs_never_carries_a_token(name: str) -> None:
    error = refusal(apply_changes(STDIO, {"token_env": name}))
    assert error.field == "token_env"
    assert "changes how the command runs" in error.detail


def test_a_token_env_that_is_also_set_in_env_is_refused() -> None:
    spec = apply_changes(STDIO, {"env": {"GITHUB_TOKEN": "x", "GITHUB_TOOLSETS": "repos"}, "token_env": "GITHUB_TOKEN"})
    error = refusal(spec)
    assert error.field == "token_env"
    assert "GITHUB_TOKEN is both token_env and a variable in env" in error.detail
    # Another variable of env is no clash.
    assert apply_changes(spec, {"token_env": "GH_TOKEN"}).validated().env == spec.env
