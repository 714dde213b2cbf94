"""Options and small parsers shared by the command groups."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Final

import typer

from bastion.cli.output import json_errors
from bastion.errors import ValidationFailed

STDIN: Final = "-"

JsonFlag = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document instead of a table (an error: a problem document, RFC 9457).",
        callback=json_errors,
    ),
]


def key_values(pairs: list[str], *, option: str) -> dict[str, str]:
    """``["A=1", "B=2"]`` as a dict; a pair without '=' is an error naming the option."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationFailed(f"{option} takes KEY=VALUE, got {key or pair!r}", field=option.lstrip("-"))
        out[key] = value
    return out


def read_secret(source: str, *, option: str) -> str:
    """A secret read from the file ``source`` (``-`` is stdin), without surrounding whitespace such as its newline.

    Secrets are never taken as plain arguments: those land in shell history and in ``ps``.
    """
    field = option.lstrip("-")
    try:
        raw = sys.stdin.read() if source == STDIN else Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(f"{option}: {source} is not UTF-8 text", field=field) from None
    except OSError as exc:
        raise ValidationFailed(f"{option}: cannot read {source} ({exc.strerror or 'error'})", field=field) from None
    value = raw.strip()
    if not value:
        raise ValidationFailed(f"{option}: {'stdin' if source == STDIN else source} is empty", field=field)
    return value
