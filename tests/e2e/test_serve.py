"""`bastion serve` as a real process: first start, health and readiness, JSON logs, graceful stop."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import httpx2
import pytest

from bastion.settings import generate_secrets
from tests.processes import Server, clean_env, serving

pytestmark = pytest.mark.e2e

GRACEFUL_S = 5


def _log_lines(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote to stderr, each of which must be one JSON object."""
    lines = [line for line in server.stderr().splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    parsed: list[dict[str, Any]] = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return parsed


def _check_a_healthy_server_then_stop_it(server: Server) -> list[dict[str, Any]]:
    with httpx2.Client(base_url=server.base_url, timeout=10) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"started": True, "draining": False, "database": True, "migrations": True}

        minted = client.get("/healthz")
        assert minted.status_code == 200
        assert minted.json()["status"] == "alive"
        minted_id = minted.headers["x-request-id"]

        supplied = client.get("/healthz", headers={"x-request-id": "e2e-probe-1"})
        assert supplied.headers["x-request-id"] == "e2e-probe-1"

    assert server.terminate(timeout=GRACEFUL_S + 5) == 0

    logs = _log_lines(server)
    requests = {e["request_id"]: e for e in logs if e.get("logger") == "bastion.http"}
    for request_id in (minted_id, "e2e-probe-1"):
        assert requests[request_id]["path"] == "/healthz"
        assert requests[request_id]["status"] == 200
    assert any(e.get("logger") == "bastion.serve" and e["msg"] == "bastion listening" for e in logs)
    assert any("stop signal received" in e["msg"] for e in logs)
    return logs


def test_embedded_first_start_generates_secrets_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(BASTION_DATA_DIR=str(data_dir), BASTION_GRACEFUL_SHUTDOWN_S=str(GRACEFUL_S))
    with serving(env, tmp_path) as server:
        logs = _check_a_healthy_server_then_stop_it(server)
    assert any(e.get("logger") == "alembic.runtime.migration" and "Running upgrade" in e["msg"] for e in logs)

    config = data_dir / "bastion.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert (data_dir / "bastion.db").is_file()
    written = config.read_text(encoding="utf-8")
    generated = tomllib.loads(written)
    assert set(generated) >= {"secret_key", "token_pepper", "audit_key", "vault_keys"}
    logged = server.stderr()
    assert not [name for name, value in generated.items() if name != "vault_primary_key_id" and value in logged]

    # The second start finds everything in place: same secrets, nothing migrated.
    with serving(env, tmp_path) as again:
        _check_a_healthy_server_then_stop_it(again)
    assert config.read_text(encoding="utf-8") == written


def test_postgres_start_with_secrets_from_the_environment_serves_and_stops_cleanly(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(
        BASTION_DATA_DIR=str(data_dir),
        BASTION_DATABASE_URL=fresh_pg_url,
        BASTION_GRACEFUL_SHUTDOWN_S=str(GRACEFUL_S),
        **{f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()},
    )
    with serving(env, tmp_path) as server:
        logs = _check_a_healthy_server_then_stop_it(server)
    assert any(e.get("database") == "postgresql+psycopg" for e in logs if e.get("logger") == "bastion.serve")
    assert not (data_dir / "bastion.toml").exists()
