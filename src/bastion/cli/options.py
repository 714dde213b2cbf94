"""Options and small parsers shared by the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.errors import ValidationFailed

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]


def key_values(pairs: list[str], *, option: str) -> dict[str, str]:
    """``["A=1", "B=2"]`` as a dict; a pair without '=' is an error naming the option."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationFailed(f"{option} takes KEY=VALUE, got {key or pair!r}", field=option.lstrip("-"))
        out[key] = value
    return out
