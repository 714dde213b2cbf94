"""How a gateway names what its servers offer: `alias__name`."""

from __future__ import annotations

from typing import Final

SEPARATOR: Final = "__"


def namespaced(alias: str, name: str) -> str:
    """The name the agent sees for ``name`` of the server mounted as ``alias``."""
    return f"{alias}{SEPARATOR}{name}"


def split(qualified: str) -> tuple[str, str] | None:
    """``(alias, name)`` for a namespaced name, or None when it carries no namespace. Aliases never contain `__`."""
    alias, sep, name = qualified.partition(SEPARATOR)
    if not sep or not alias or not name:
        return None
    return alias, name
