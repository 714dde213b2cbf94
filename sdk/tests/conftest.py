"""Fixtures for the SDK's tests: the token map on SQLite and on a real PostgreSQL (a database of this run's own)."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion_agent import TokenCipher, TokenMap

PG_ADMIN_URL = os.environ.get("BASTION_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def agent_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the SDK's tests in this run, dropped afterwards."""
    name = f"bastion_agent_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def map_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each engine in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'agent.db'}"
    url: str = request.getfixturevalue("agent_pg_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in ("connections", "tokens", "hosts", "deliveries"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS bastion_agent_{table}"))
    engine.dispose()
    return url


@pytest.fixture
def cipher() -> TokenCipher:
    return TokenCipher(secrets.token_bytes(32))


@pytest.fixture
async def token_map(map_url: str, cipher: TokenCipher) -> AsyncIterator[TokenMap]:
    token_map = await TokenMap.open(map_url, cipher)
    try:
        yield token_map
    finally:
        await token_map.close()
