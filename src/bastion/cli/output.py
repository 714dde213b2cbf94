"""The CLI's only output layer: readable rich tables by default, one JSON document with --json."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bastion.errors import BastionError, problem_of


def _width() -> int | None:
    """A terminal's own width; piped or redirected, 200 columns (or $COLUMNS) so that tables keep whole values."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() else 200


console = Console(width=_width())
err_console = Console(stderr=True)


def reinitialise() -> None:
    """Size and colour the consoles for this process's own stdout and stderr again (the warm CLI's child runs
    with the launcher's descriptors, not the ones these were made for). Modules hold these very objects."""
    console.__init__(width=_width())  # type: ignore[misc]  # re-running __init__ keeps every reference valid
    err_console.__init__(stderr=True)  # type: ignore[misc]


# Exit codes people and scripts can branch on.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_FORBIDDEN = 5
EXIT_CONFIG = 6
EXIT_UNAVAILABLE = 7

_EXIT_BY_STATUS = {
    404: EXIT_NOT_FOUND,
    409: EXIT_CONFLICT,
    412: EXIT_CONFLICT,
    401: EXIT_FORBIDDEN,
    403: EXIT_FORBIDDEN,
    422: EXIT_USAGE,
    503: EXIT_UNAVAILABLE,
}


def plain(value: Any) -> Any:
    """Dataclasses, enums, datetimes, sets and tuples as JSON-ready values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}  # type: ignore[misc]
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]  # type: ignore[misc]
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    return value


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(plain(document), indent=2, ensure_ascii=False) + "\n")


def cell(value: Any) -> str:
    """A value as table text; brackets in data are shown as typed, never read as rich markup."""
    return escape(_text(value))


def _text(value: Any) -> str:
    value = plain(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"  # type: ignore[misc]
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"  # type: ignore[misc]
    return str(value)


def emit_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, title: str | None = None) -> None:
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    console.print(table)
    if not rows:
        console.print("[dim](none)[/dim]")


def emit_record(record: Mapping[str, Any], *, title: str | None = None) -> None:
    table = Table(title=title, show_header=False, box=None)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in record.items():
        table.add_row(key.replace("_", " "), cell(value))
    console.print(table)


def emit_one(record: Mapping[str, Any], json_out: bool, *, message: str | None = None) -> None:
    """One object: the JSON document, or a confirmation line (stderr) and a field table."""
    if json_out:
        emit_json(record)
        return
    if message:
        success(message)
    emit_record(record)


def emit_many(records: Sequence[Mapping[str, Any]], json_out: bool, columns: Sequence[str], *, title: str) -> None:
    """A listing: a JSON array of every item, or a table of the chosen columns."""
    if json_out:
        emit_json(list(records))
    else:
        emit_table(records, columns, title=title)


def success(message: str) -> None:
    err_console.print(f"[green]✓[/green] {escape(message)}", soft_wrap=True)


def info(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]![/yellow] {escape(message)}", soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int) -> Generator[Callable[[int], None], None, None]:
    """A progress bar on stderr (stdout stays one JSON document); yields ``advance(n)``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(count: int) -> None:
            bar.update(task, advance=count)

        yield advance


_json_errors = False


def json_errors(enabled: bool) -> bool:
    """The --json option's callback: this command's errors are printed as a problem document on stdout."""
    global _json_errors  # one command per process; the root command resets it before each
    _json_errors = enabled
    return enabled


def fail(error: BastionError) -> NoReturn:
    code = _EXIT_BY_STATUS.get(error.status, EXIT_CONFIG if error.code == "config_invalid" else EXIT_ERROR)
    if _json_errors:
        emit_json({**problem_of(error), "exit_code": code})
        raise typer.Exit(code)
    where = f" (field: {error.field})" if error.field else ""
    # One line per message, however long (paths, URLs): the terminal wraps it, a script can grep it.
    err_console.print(f"[red]error[/red] {escape(f'[{error.code}] {error.detail}{where}')}", soft_wrap=True)
    raise typer.Exit(code)
