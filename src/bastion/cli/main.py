"""Entry point: `bastion init|serve|db …` and the admin command groups."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Annotated, cast

import typer

from bastion import __version__
from bastion.cli.groups import LazyGroup
from bastion.cli.options import JsonFlag
from bastion.cli.output import console, emit_json, emit_record, fail, info, success
from bastion.errors import BastionError

# Each command imports what it needs when it runs: `bastion --help` and `bastion version` load no database,
# web or MCP code, and an admin group loads only its own module (bastion/cli/groups.py).
app = typer.Typer(
    name="bastion",
    cls=LazyGroup,
    help="Bastion: a self-hostable MCP gateway that calls upstreams as each person.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.command()
def version(json_out: JsonFlag = False) -> None:
    """Print Bastion's version."""
    if json_out:
        emit_json({"version": __version__})
    else:
        console.print(__version__)


@app.command()
def init(
    owner_email: Annotated[str | None, typer.Option(help="Create this owner and print an API key for them.")] = None,
    owner_name: Annotated[str | None, typer.Option(help="The owner's display name.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Prepare the data directory: generate secrets, migrate the database, create the workspace. Idempotent."""
    from bastion.cli import boot
    from bastion.cli.context import cli_settings, run
    from bastion.cli.owner import ensure_owner
    from bastion.db import migrate

    async def body() -> dict[str, object]:
        prepared = await boot.prepare(cli_settings(may_create=True), generate=True)
        result: dict[str, object] = {
            "data_dir": str(prepared.settings.data_dir.resolve()),
            "config_file": str(prepared.wrote_config) if prepared.wrote_config else None,
            "database": migrate.current(prepared.settings.resolved_database_url),
            "workspace_id": prepared.workspace.id,
        }
        if owner_email:
            result["owner"] = await ensure_owner(prepared.settings, owner_email, owner_name)
        return result

    result = run(body)
    if json_out:
        emit_json(result)
        return
    if result["config_file"]:
        success(f"generated secrets into {result['config_file']} (mode 0600)")
    success(f"database at revision {result['database']}")
    emit_record({k: v for k, v in result.items() if k != "owner"}, title="Bastion is ready")
    owner = result.get("owner")
    if isinstance(owner, dict):
        shown = cast(dict[str, object], owner)
        if shown.get("api_key"):
            console.print(f"\nAPI key for {shown['email']} (shown once): [bold]{shown['api_key']}[/bold]")
        else:
            # The first key was printed once, by the first init; a lost key is replaced, never shown again.
            info(
                f"{shown['email']} is already an owner; their first API key was printed by the first `bastion init`. "
                f"Lost it? `bastion apikey create --member {shown['email']} --name laptop` mints another "
                "(and `bastion apikey revoke` retires the old one)."
            )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default from BASTION_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from BASTION_PORT, 8080).")] = None,
) -> None:
    """Run the gateway. On the embedded database the first start prepares everything itself."""
    from bastion.cli.serving import serve as run_server

    run_server(host=host, port=port)


@contextmanager
def _clean_errors() -> Generator[None, None, None]:
    """Bad settings or an unreachable database: a one-line message and an exit code, not a traceback."""
    try:
        yield
    except BastionError as error:
        fail(error)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from bastion.cli.context import cli_settings
    from bastion.db import migrate

    with _clean_errors():
        settings = cli_settings()
        migrate.upgrade(settings.resolved_database_url, revision)
        success(f"database at revision {migrate.current(settings.resolved_database_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base or -1.")]) -> None:
    """Undo migrations down to REVISION."""
    from bastion.cli.context import cli_settings
    from bastion.db import migrate

    with _clean_errors():
        settings = cli_settings()
        migrate.downgrade(settings.resolved_database_url, revision)
        success(f"database at revision {migrate.current(settings.resolved_database_url) or 'base'}")


@db_app.command("current")
def db_current(json_out: JsonFlag = False) -> None:
    """Show the database's revision and the newest one this version knows."""
    from bastion.cli.context import cli_settings
    from bastion.db import migrate

    with _clean_errors():
        settings = cli_settings()
        current = migrate.current(settings.resolved_database_url)
    doc = {"current": current, "head": migrate.head(), "up_to_date": current == migrate.head()}
    if json_out:
        emit_json(doc)
    else:
        emit_record(doc)


def main() -> None:
    app()
