"""Fixtures shared by every test: both database engines, a store, settings, an API client and keys.

Every storage-touching test runs twice, on SQLite and on a real PostgreSQL. The PostgreSQL database
is created fresh for the run and dropped at the end; it is never skipped (CI has PostgreSQL).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import hypothesis
import pytest
import sqlalchemy as sa

from bastion import wiring
from bastion.db import migrate
from bastion.db.schema import metadata
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.domain.specs import MemberSpec
from bastion.services import apikeys, members, workspace
from bastion.services.apikeys import KeyHasher
from bastion.services.audit import AuditKeys
from bastion.settings import Settings, generate_secrets
from bastion.web.app import create_app
from tests.mcp_support import untraced as mcp_untraced

# Tests never time: no deadline per example (on a loaded machine a slow example would be re-run and reported
# as flaky, or as failing, for how long it took rather than what it did).
hypothesis.settings.register_profile("bastion", deadline=None)
hypothesis.settings.load_profile("bastion")

# xdist workers get COLUMNS=80 from their launcher; the CLI's tables are read here as a pipe sees them.
os.environ.pop("COLUMNS", None)

LOADED_MACHINE_TIMEOUT_S = 60.0

PG_ADMIN_URL = os.environ.get("BASTION_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ENGINES = ("sqlite", "postgresql")


# Modules whose tests take tens of seconds each, with a rough weight (their seconds on a 2-core machine). Under
# pytest-xdist they are handed out first, one module to the worker with the least weight so far (``_heaviest_first``),
# so that the long poles start at once instead of ending the run alone. The browser journey is not among them: its
# peers (an authorization server in Node, Chromium, two processes of ours) started beside the three heaviest
# overran every start bound once; after the first wave it has the machine to share with one heavy module at most.
HEAVY_MODULES: dict[str, int] = {
    "tests/e2e/test_conformance_auth.py": 200,
    "tests/e2e/test_conformance.py": 80,
    "tests/web/test_access_matrix.py": 50,
    "tests/e2e/test_isolation.py": 70,
    "tests/e2e/test_replicas.py": 60,
    "tests/e2e/test_audit_durability.py": 60,
    "tests/e2e/test_database_outage.py": 40,
    "tests/e2e/test_churn.py": 40,
    "tests/e2e/test_changes_hold.py": 40,
    "tests/e2e/test_server_everything.py": 30,
    "tests/web/test_api_schema.py": 50,
    "tests/e2e/test_lifecycle_machine.py": 40,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        items[:] = _heaviest_first(items, workers)


def _heaviest_first(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` laid out for xdist's work-stealing scheduler, which gives each worker one contiguous, equal share
    of the list at the start: each share begins with whole heavy modules (largest first, to the lightest share),
    and the other tests, in their order, fill the shares up to equal length."""
    modules: dict[str, list[pytest.Item]] = {}
    light: list[pytest.Item] = []
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if module in HEAVY_MODULES:
            modules.setdefault(module, []).append(item)
        else:
            light.append(item)
    shares: list[list[pytest.Item]] = [[] for _ in range(workers)]
    weights = [0] * workers
    for module in sorted(modules, key=lambda m: (-HEAVY_MODULES[m], m)):
        lightest = weights.index(min(weights))
        shares[lightest].extend(modules[module])
        weights[lightest] += HEAVY_MODULES[module]
    # The scheduler's shares: len(pending) // remaining workers, in turn.
    sizes: list[int] = []
    left = len(items)
    for remaining in range(workers, 0, -1):
        sizes.append(left // remaining)
        left -= sizes[-1]
    ordered: list[pytest.Item] = []
    start = 0
    for share, size in zip(shares, sizes, strict=True):
        take = max(size - len(share), 0)
        ordered.extend(share)
        ordered.extend(light[start : start + take])
        start += take
    ordered.extend(light[start:])
    return ordered


@pytest.fixture
def untraced() -> Iterator[None]:
    """The whole test runs without coverage's tracer in this process (tests.mcp_support.untraced). For the property
    and peer suites that drive a gateway for minutes: they check invariants and answers, not lines, which the other
    tests cover; tracing made them about three times slower. Processes they start are measured as usual."""
    with mcp_untraced():
        yield


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True, scope="session")
def private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Running `bastion serve`s record themselves under $XDG_STATE_HOME: each xdist worker gets its own, so no
    test reads another's records (or the person's ~/.local/state)."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


def _pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    name = f"bastion_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        # A test database need not survive a crash: commits stop waiting for the WAL flush.
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    try:
        yield _pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_migrated_url(pg_server_url: str) -> str:
    migrate.upgrade(pg_server_url)
    return pg_server_url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "bastion.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@functools.cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.NullPool)


def empty_all(url: str) -> None:
    """Every table emptied, children first. DELETE on a few rows costs ~10 ms where TRUNCATE of every table
    costs 0.6-1.1 s (it rewrites each table's files); identity sequences keep counting, which no test reads."""
    with _engine(url).begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on each engine in turn."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "bastion.db"
        shutil.copy(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    url: str = request.getfixturevalue("pg_migrated_url")
    empty_all(url)
    yield url


@pytest.fixture
async def store(db_url: str, settings: Settings) -> AsyncIterator[Store]:
    s = wiring.store_from(settings)
    await workspace.ensure_workspace(s)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def operator(store: Store) -> Actor:
    return Actor.local_operator((await workspace.default_workspace(store)).id)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    # Test upstreams listen on http://127.0.0.1: the tests opt in to the outbound policy's loopback allowance.
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        outbound_allow_loopback=True,
        # Fail-closed deadlines are for production databases; a test machine loaded by a second suite can take
        # longer than 10 s to write an event (the tests of the deadline itself inject the failure).
        audit_open_timeout_s=LOADED_MACHINE_TIMEOUT_S,
        **generate_secrets(),  # type: ignore[arg-type]
    )


@pytest.fixture
def hasher(settings: Settings) -> KeyHasher:
    assert settings.token_pepper is not None
    return KeyHasher(settings.token_pepper.get_secret_value().encode("utf-8"))


@pytest.fixture
async def client(settings: Settings, store: Store) -> AsyncIterator[httpx2.AsyncClient]:
    app = create_app(settings, store)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://bastion.test") as c:
        yield c


async def member_with_key(store: Store, hasher: KeyHasher, operator: Actor, email: str, role: str) -> dict[str, str]:
    """A member holding ``role`` and the Authorization header for a fresh API key of theirs."""
    member = await members.create(store, operator, MemberSpec(email, email.split("@")[0], role))
    _key, secret = await apikeys.create(store, hasher, operator, name="test", member=member.id)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def owner_headers(store: Store, hasher: KeyHasher, operator: Actor) -> dict[str, str]:
    return await member_with_key(store, hasher, operator, "owner@example.com", OWNER_ROLE)


def problem_of(response: Any) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty PostgreSQL database of this test's own (no migrations), dropped afterwards."""
    name = f"bastion_fresh_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield _pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def keyring(settings: Settings) -> Any:
    from bastion.vault.crypto import Keyring

    assert settings.vault_primary_key_id is not None
    return Keyring(settings.vault_keyring(), settings.vault_primary_key_id)


@pytest.fixture
def vault(keyring: Any) -> Any:
    from bastion.vault.sealer import Vault

    return Vault(keyring)


@pytest.fixture
async def pg_store(pg_migrated_url: str) -> AsyncIterator[Store]:
    """An emptied PostgreSQL store with the workspace made, for races only row locks settle (SQLite serialises)."""
    empty_all(pg_migrated_url)
    s = Store.from_url(pg_migrated_url, audit=AuditKeys.from_secret(secrets.token_bytes(32)).chain_keys())
    await workspace.ensure_workspace(s)
    try:
        yield s
    finally:
        await s.close()
