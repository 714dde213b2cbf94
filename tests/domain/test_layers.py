"""Imports point down only: web/cli → pipeline → services → db and the other adapters → domain (pure)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

import bastion

SRC: Final = Path(bastion.__file__).parent

# Frameworks, clients and drivers the domain must never see.
THIRD_PARTY_BANNED_IN_DOMAIN: Final = frozenset({
    "starlette", "fastapi", "httpx2", "httpx", "sqlalchemy", "alembic", "redis", "psycopg", "aiosqlite", "uvicorn",
    "pydantic", "pydantic_settings", "typer", "rich", "cryptography", "mcp", "anyio",
})  # fmt: skip

# Per layer, the bastion packages and modules it may not import (they sit at its level or above it).
FORBIDDEN: Final = {
    "domain": ("bastion.db", "bastion.services", "bastion.web", "bastion.cli", "bastion.vault", "bastion.events",
               "bastion.settings", "bastion.wiring", "bastion.pipeline"),
    "pipeline": ("bastion.web", "bastion.cli", "bastion.wiring"),
    "services": ("bastion.web", "bastion.cli", "bastion.wiring", "bastion.pipeline"),
    "db": ("bastion.services", "bastion.web", "bastion.cli", "bastion.wiring", "bastion.pipeline"),
    "vault": ("bastion.services", "bastion.web", "bastion.cli", "bastion.wiring", "bastion.db", "bastion.pipeline"),
    "events": ("bastion.services", "bastion.web", "bastion.cli", "bastion.wiring", "bastion.pipeline"),
    "web": ("bastion.cli",),
    "net": ("bastion.services", "bastion.web", "bastion.cli", "bastion.wiring", "bastion.db", "bastion.oauth",
            "bastion.pipeline"),
    "oauth": ("bastion.web", "bastion.cli", "bastion.wiring", "bastion.pipeline"),
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, *, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for every import in ``source``, including those in functions and TYPE_CHECKING."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # `from bastion import db` imports bastion.db
                yield node.lineno, f"{target}.{alias.name}"


def _imports_of(path: Path) -> Iterator[tuple[int, str]]:
    yield from _imports(path.read_text(encoding="utf-8"), _module_name(path), is_package=path.name == "__init__.py")


def _modules_in(layer: str) -> list[Path]:
    return sorted((SRC / layer).rglob("*.py"))


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_walk_sees_every_layer_and_resolves_relative_imports() -> None:
    for layer in FORBIDDEN:
        assert _modules_in(layer), layer
    source = "from . import naming\nfrom ..db import schema\n\ndef f():\n    import sqlalchemy.orm\n"
    found = {name for _, name in _imports(source, "bastion.domain.policy")}
    assert {"bastion.domain.naming", "bastion.db", "bastion.db.schema", "sqlalchemy.orm"} <= found


@pytest.mark.parametrize("path", _modules_in("domain"), ids=lambda p: p.name)
def test_the_domain_imports_no_framework_client_or_driver(path: Path) -> None:
    offending = [
        f"{path.name}:{line} imports {name}"
        for line, name in _imports_of(path)
        if name.split(".")[0] in THIRD_PARTY_BANNED_IN_DOMAIN
    ]
    assert offending == []


@pytest.mark.parametrize(
    ("layer", "path"),
    [(layer, path) for layer in FORBIDDEN for path in _modules_in(layer)],
    ids=lambda v: v if isinstance(v, str) else v.relative_to(SRC).as_posix(),
)
def test_imports_point_down_only(layer: str, path: Path) -> None:
    offending = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for line, name in _imports_of(path)
        if any(_is_within(name, prefix) for prefix in FORBIDDEN[layer])
    ]
    assert offending == []
