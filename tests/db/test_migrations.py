"""The Alembic history on both engines: reversible, identical to schema.py, workspace-scoped, replica-safe."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bastion.db import migrate, schema
from bastion.db.engine import sync_url
from bastion.db.schema import metadata
from bastion.settings import generate_secrets
from tests.processes import BASTION, clean_env, run_bastion

# Install-wide tables that belong to no single workspace. The keyring comes from the environment and
# serves every workspace of the install, so its usage counters do too.
# The audit chain is one per install (like the keyring); its rows name their workspace without a foreign key.
INSTALL_WIDE = frozenset(
    {"workspaces", "vault_keys", "audit_events", "audit_head", "audit_checkpoints", "change_log", "replicas"}
)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it, not even Alembic's table."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bastion.db'}"
    else:
        yield request.getfixturevalue("fresh_pg_url")


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(sync_url(url))
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trips_and_base_leaves_no_tables(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    assert _tables(empty_url) == {t.name for t in metadata.sorted_tables} | {"alembic_version"}
    assert migrate.current(empty_url) == migrate.head()

    migrate.downgrade(empty_url, "base")
    assert _tables(empty_url) <= {"alembic_version"}
    assert migrate.current(empty_url) is None

    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == migrate.head()


def test_the_migrated_schema_matches_schema_py_exactly(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    engine = sa.create_engine(sync_url(empty_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_every_table_but_the_install_wide_ones_carries_a_workspace_id(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    engine = sa.create_engine(sync_url(empty_url))
    try:
        inspector = sa.inspect(engine)
        unscoped = {
            name
            for name in inspector.get_table_names()
            if name != "alembic_version" and "workspace_id" not in {c["name"] for c in inspector.get_columns(name)}
        }
    finally:
        engine.dispose()
    assert unscoped == INSTALL_WIDE & {t.name for t in metadata.sorted_tables}


def test_every_workspace_id_column_in_schema_py_is_required_and_points_at_workspaces() -> None:
    for table in metadata.sorted_tables:
        if table.name in INSTALL_WIDE:
            continue
        column = table.c.workspace_id
        assert not column.nullable, table.name
        assert {fk.column.table.name for fk in column.foreign_keys} == {"workspaces"}, table.name


@pytest.mark.e2e
def test_db_current_reports_whether_the_database_is_up_to_date(empty_url: str, tmp_path: Path) -> None:
    env = clean_env(BASTION_DATA_DIR=str(tmp_path / "data"), BASTION_DATABASE_URL=empty_url)

    before = run_bastion("db", "current", "--json", env=env, cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == {"current": None, "head": migrate.head(), "up_to_date": False}

    upgraded = run_bastion("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr

    after = run_bastion("db", "current", "--json", env=env, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout) == {"current": migrate.head(), "head": migrate.head(), "up_to_date": True}


@pytest.mark.e2e
def test_db_commands_on_an_unreachable_database_fail_cleanly(tmp_path: Path) -> None:
    env = clean_env(
        BASTION_DATA_DIR=str(tmp_path / "data"), BASTION_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere"
    )
    upgrade = run_bastion("db", "upgrade", env=env, cwd=tmp_path)
    assert upgrade.returncode != 0
    assert "Traceback" not in upgrade.stderr
    assert "cannot use the database" in " ".join(upgrade.stderr.split())
    # With --json the error is a problem document on stdout, carrying the exit code.
    current = run_bastion("db", "current", "--json", env=env, cwd=tmp_path)
    assert "Traceback" not in current.stderr
    problem = json.loads(current.stdout)
    assert "cannot use the database" in problem["detail"]
    assert problem["exit_code"] == current.returncode == upgrade.returncode != 0


@pytest.mark.e2e
def test_replicas_upgrading_a_fresh_postgres_at_once_both_succeed(fresh_pg_url: str, tmp_path: Path) -> None:
    env = clean_env(BASTION_DATA_DIR=str(tmp_path / "data"), BASTION_DATABASE_URL=fresh_pg_url)
    replicas = [
        subprocess.Popen(
            [str(BASTION), "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        outcomes = [(p.wait(timeout=60), p.communicate()[1]) for p in replicas]
    finally:
        for p in replicas:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [code for code, _ in outcomes] == [0] * len(replicas), [err for _, err in outcomes]
    assert migrate.current(fresh_pg_url) == migrate.head()


@pytest.mark.e2e
def test_replicas_starting_at_once_on_a_fresh_postgres_make_one_workspace(fresh_pg_url: str, tmp_path: Path) -> None:
    secrets_env = {f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()}
    replicas = [
        subprocess.Popen(
            [str(BASTION), "init", "--json"],
            env=clean_env(
                BASTION_DATA_DIR=str(tmp_path / f"replica-{i}"), BASTION_DATABASE_URL=fresh_pg_url, **secrets_env
            ),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    try:
        outcomes = [(p.wait(timeout=60), *p.communicate()) for p in replicas]
    finally:
        for p in replicas:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [code for code, _, _ in outcomes] == [0] * len(replicas), [err for _, _, err in outcomes]
    assert len({json.loads(out)["workspace_id"] for _, out, _ in outcomes}) == 1
    engine = sa.create_engine(sync_url(fresh_pg_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM workspaces")).scalar_one() == 1
    finally:
        engine.dispose()


def test_servers_left_on_the_old_dynamic_default_follow_the_specification_s_order(empty_url: str) -> None:
    """0005 turns "dynamic" (the default nobody chose before it) into "auto"; other settings are kept."""
    migrate.upgrade(empty_url, "0004")
    now = datetime.now(UTC)
    server = {"description": "", "transport": "streamable_http", "url": "https://x.example/mcp", "command": None}
    server |= {"args": [], "env": {}, "auth_kind": "oauth", "era": "auto", "connect_timeout_s": 5.0}
    server |= {"call_timeout_s": 30.0, "version": 1, "created_at": now, "updated_at": now, "workspace_id": "w"}
    engine = sa.create_engine(sync_url(empty_url))
    try:
        with engine.begin() as conn:
            conn.execute(schema.workspaces.insert().values(id="w", name="w", created_at=now))
            for name, oauth in (("a", {"registration": "dynamic", "scopes": ["s"]}), ("b", {"registration": "x"})):
                conn.execute(schema.servers.insert().values(id=name, name=name, oauth=oauth, **server))
        migrate.upgrade(empty_url)

        def settings() -> dict[str, object]:
            with engine.connect() as conn:
                return {
                    row.id: row.oauth for row in conn.execute(sa.select(schema.servers.c.id, schema.servers.c.oauth))
                }

        assert settings() == {"a": {"registration": "auto", "scopes": ["s"]}, "b": {"registration": "x"}}
        migrate.downgrade(empty_url, "0004")
        assert settings()["a"] == {"registration": "dynamic", "scopes": ["s"]}
    finally:
        engine.dispose()


def test_0007_adds_token_env_empty_and_dropping_it_keeps_servers_and_what_points_at_them(empty_url: str) -> None:
    """On SQLite too the column is added and dropped in place: no table copy that would cascade to identities."""
    migrate.upgrade(empty_url, "0006")
    now = datetime.now(UTC)
    server = {"description": "", "transport": "stdio", "url": None, "command": "npx", "args": [], "env": {}}
    server |= {"auth_kind": "bearer", "oauth": None, "era": "auto", "connect_timeout_s": 5.0, "call_timeout_s": 30.0}
    server |= {"version": 1, "created_at": now, "updated_at": now, "workspace_id": "w"}
    identity = {"workspace_id": "w", "owner_id": None, "kind": "bearer", "status": "active", "label": "shared"}
    identity |= {"fingerprint": "f", "last4": "abcd", "details": {}, "kek_id": "k", "dek_wrapped": b"d"}
    identity |= {"secret_sealed": b"s", "version": 1, "created_at": now, "updated_at": now}
    servers, identities = schema.servers, schema.identities
    engine = sa.create_engine(sync_url(empty_url))
    try:
        with engine.begin() as conn:
            conn.execute(schema.workspaces.insert().values(id="w", name="w", created_at=now))
            conn.execute(servers.insert().values(id="gh", name="gh", **server))
            conn.execute(identities.insert().values(id="i", server_id="gh", **identity))
        migrate.upgrade(empty_url)
        with engine.begin() as conn:
            assert conn.execute(sa.select(servers.c.token_env)).scalar_one() is None
            conn.execute(servers.update().values(token_env="GITHUB_PERSONAL_ACCESS_TOKEN"))
        migrate.downgrade(empty_url, "0006")
        with engine.connect() as conn:
            assert "token_env" not in {c["name"] for c in sa.inspect(conn).get_columns("servers")}
            assert conn.execute(sa.select(servers.c.id)).scalars().all() == ["gh"]
            assert conn.execute(sa.select(identities.c.id, identities.c.server_id)).all() == [("i", "gh")]
    finally:
        engine.dispose()


def test_the_head_the_code_names_is_the_newest_migration_alembic_finds() -> None:
    """``migrate.HEAD`` lets a restart skip importing Alembic; it must name the one head of migrations/versions."""
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_heads() == [migrate.HEAD]


def test_a_database_at_the_head_is_upgraded_without_importing_alembic(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    code = "import sys; from bastion.db import migrate; migrate.upgrade(sys.argv[1]); print('alembic' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code, empty_url], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert migrate.current(empty_url) == migrate.HEAD


def test_0010_leaves_existing_seals_unbound_and_refuses_to_go_back_below_a_bound_one(empty_url: str) -> None:
    """Rows sealed before 0010 stay as they are (rebind re-seals them online); their workspace is not yet marked."""
    migrate.upgrade(empty_url, "0009")
    now = datetime.now(UTC)
    server = {"description": "", "transport": "stdio", "url": None, "command": "npx", "args": [], "env": {}}
    server |= {"auth_kind": "bearer", "oauth": None, "era": "auto", "connect_timeout_s": 5.0, "call_timeout_s": 30.0}
    server |= {"version": 1, "created_at": now, "updated_at": now, "workspace_id": "w", "token_env": None}
    identity = {"workspace_id": "w", "owner_id": None, "kind": "bearer", "status": "active", "label": "shared"}
    identity |= {"fingerprint": "f", "last4": "abcd", "details": {}, "kek_id": "k", "dek_wrapped": b"d"}
    identity |= {"secret_sealed": b"s", "version": 1, "created_at": now, "updated_at": now, "server_id": "gh"}
    workspaces, identities = schema.workspaces, schema.identities
    engine = sa.create_engine(sync_url(empty_url))
    try:
        with engine.begin() as conn:
            # Only the columns named are written, so these inserts hold at 0009 too.
            conn.execute(workspaces.insert().values(id="w", name="w", created_at=now))
            conn.execute(schema.servers.insert().values(id="gh", name="gh", **server))
            conn.execute(identities.insert().values(id="old", **identity))
        migrate.upgrade(empty_url)
        with engine.begin() as conn:
            assert conn.execute(sa.select(identities.c.sealed_bound)).scalar_one() is False
            assert conn.execute(sa.select(workspaces.c.seals_bound_at)).scalar_one() is None
            conn.execute(identities.insert().values(id="new", sealed_bound=True, **identity))
        with pytest.raises(RuntimeError, match="1 row"):
            migrate.downgrade(empty_url, "0009")
        with engine.begin() as conn:
            conn.execute(identities.delete().where(identities.c.id == "new"))
        migrate.downgrade(empty_url, "0009")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM identities")).scalars().all() == ["old"]
    finally:
        engine.dispose()
