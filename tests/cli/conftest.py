"""Driving the `bastion` CLI in-process on each database engine, configured only through the environment."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import sqlalchemy as sa
from click.testing import Result
from typer.testing import CliRunner

from bastion.cli.main import app
from bastion.db.engine import sync_url
from bastion.db.store import Store
from bastion.settings import generate_secrets

T = TypeVar("T")


class Cli:
    """Runs one command and checks its exit code; ``json`` parses the single document it printed."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0, input: str | None = None) -> Result:
        result = self.runner.invoke(app, list(args), input=input)
        assert result.exit_code == code, (
            f"`bastion {' '.join(args)}` exited {result.exit_code}, expected {code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
        )
        return result

    def json(self, *args: str, input: str | None = None) -> Any:
        return json.loads(self(*args, "--json", input=input).stdout)


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in [n for n in os.environ if n.startswith("BASTION_")]:
        monkeypatch.delenv(name)
    env = {"BASTION_DATA_DIR": str(tmp_path / "data"), "BASTION_DATABASE_URL": db_url}
    env["BASTION_OUTBOUND_ALLOW_LOOPBACK"] = "true"  # test upstreams listen on http://127.0.0.1
    env.update({f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def cli(cli_env: dict[str, str]) -> Cli:
    """A CLI whose database has been through `bastion init` (migrated, workspace and built-in roles)."""
    runner = Cli()
    runner("init")
    return runner


def dump_table(db_url: str, table: str) -> str:
    """Every row of ``table`` as text, to search for values that must never be stored."""
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT * FROM "{table}"')).all()  # noqa: S608  fixed table names only
    finally:
        engine.dispose()
    return "\n".join(repr(tuple(r)) for r in rows)


def with_store(db_url: str, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``fn`` against the database the CLI uses, outside any command (the CLI runs its own event loop)."""

    async def body() -> T:
        store = Store.from_url(db_url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return anyio.run(body)


def secret_file(directory: Path, name: str, value: str) -> str:
    """A file holding ``value`` and a newline, as people write token files; returns its path."""
    path = directory / name
    path.write_text(value + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def enrolled(cli: Cli, tmp_path: Path) -> dict[str, Any]:
    """A per-user server behind a gateway, a host, and a member holding one identity for the server."""
    cli("server", "create", "github", "--url", "https://api.githubcopilot.com/mcp/", "--auth-kind", "bearer")
    cli("gateway", "create", "sales", "--server", "github")
    cli("host", "create", "sales-agent")
    cli("member", "create", "alice@example.com")
    token = "ghp_" + "Alice" * 6 + "9z8Y"
    identity = cli.json(
        "identity", "create", "--member", "alice@example.com", "--server", "github",
        "--bearer-token-file", secret_file(tmp_path, "alice.token", token),
    )  # fmt: skip
    return {"identity": identity, "token": token}
