"""`bastion serve` as a real process: first start, health and readiness, JSON logs, graceful stop."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import stat
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx2
import pytest

from bastion.settings import generate_secrets
from bastion.web import edge
from tests.processes import (
    BASTION,
    START_TIMEOUT_S,
    Server,
    clean_env,
    instance_record,
    run_bastion,
    serving,
    wait_until_healthy,
)

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

        # The listener's own limits (web/edge.py) hold before the app: an oversized head never reaches it.
        oversized = client.get("/healthz", headers={"x-big": "a" * edge.MAX_HEAD_BYTES})
        assert oversized.status_code == 431
        assert oversized.json()["detail"] == f"the request head is over {edge.MAX_HEAD_BYTES} bytes"

    assert server.terminate(timeout=GRACEFUL_S + 5) == 0

    logs = _log_lines(server)
    requests = {e["request_id"]: e for e in logs if e.get("logger") == "bastion.http"}
    for request_id in (minted_id, "e2e-probe-1"):
        assert requests[request_id]["path"] == "/healthz"
        assert requests[request_id]["status"] == 200
    assert any(e.get("logger") == "bastion.serve" and e["msg"] == "bastion listening" for e in logs)
    assert any("stop signal received" in e["msg"] for e in logs)
    door = [e for e in logs if e.get("logger") == "bastion.edge"]
    assert [(e["level"], e["counts"]) for e in door] == [("warning", {"request head too large": 1})], door
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


def _state_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A clean environment whose running-instance records are this test's own."""
    return clean_env(XDG_STATE_HOME=str(tmp_path / "state"), **settings)


def _spawn_on_port_0(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """`bastion serve --port 0` in ``cwd``, its stderr in a file there."""
    with (cwd / "serve.stderr").open("ab") as stderr:
        return subprocess.Popen(
            [str(BASTION), "serve", "--port", "0"], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr
        )


def _started_on_port_0(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A healthy `bastion serve --port 0` and its base URL, read from the record it keeps for the CLI."""
    process = _spawn_on_port_0(env, cwd)
    return process, _base_url_of(process, env, cwd)


def _base_url_of(process: subprocess.Popen[bytes], env: dict[str, str], cwd: Path) -> str:
    base_url: str = instance_record(Path(env["XDG_STATE_HOME"]), naming="base_url", process=process)["base_url"]
    try:
        wait_until_healthy(process, base_url)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(cwd / 'serve.stderr').read_text(encoding='utf-8')}") from None
    return base_url


def test_the_cli_finds_the_running_instance_from_any_directory_and_prints_its_address(tmp_path: Path) -> None:
    served, elsewhere = tmp_path / "served", tmp_path / "elsewhere"
    served.mkdir()
    elsewhere.mkdir()
    env = _state_env(tmp_path)
    process, base_url = _started_on_port_0(env, served)
    try:
        assert base_url.startswith("http://127.0.0.1:") and not base_url.endswith(":8080")
        made = run_bastion("host", "create", "agent", env=env, cwd=elsewhere)
        assert made.returncode == 0, made.stderr
        assert f"using {served / '.bastion'}, served at {base_url}" in made.stderr
        run_bastion("gateway", "create", "sales", env=env, cwd=elsewhere)
        link = run_bastion("link", "create", "--host", "agent", "--gateway", "sales", "--json", env=env, cwd=served)
        assert json.loads(link.stdout)["url"].startswith(f"{base_url}/enroll/bsl_")
        assert not (elsewhere / ".bastion").exists()  # nothing was created where the command ran
    finally:
        process.terminate()
        process.wait(timeout=15)

    gone = run_bastion("host", "list", "--json", env=env, cwd=elsewhere)
    assert gone.returncode == 6
    problem = json.loads(gone.stdout)
    assert problem["code"] == "config_invalid" and str(elsewhere / ".bastion") in problem["detail"]
    assert "no running `bastion serve`" in problem["detail"]


def test_a_busy_port_fails_at_once_naming_who_holds_it(tmp_path: Path) -> None:
    env = _state_env(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = run_bastion("serve", "--port", str(port), env=env, cwd=tmp_path, timeout=30)
    assert refused.returncode == 6, refused.stderr
    assert f"port {port} on 127.0.0.1 is in use by another process" in refused.stderr
    assert not (tmp_path / ".bastion").exists()  # refused before preparing anything

    process, base_url = _started_on_port_0(env, tmp_path)
    try:
        port = int(base_url.rsplit(":", 1)[1])
        second = run_bastion("serve", "--port", str(port), env=env, cwd=tmp_path, timeout=30)
        assert second.returncode == 6
        assert f"is in use by bastion serve (pid {process.pid}, data {tmp_path / '.bastion'})" in second.stderr
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_serve_in_a_terminal_prints_where_it_listens_and_what_to_run_next(tmp_path: Path) -> None:
    env = _state_env(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: serve on a terminal
        os.chdir(tmp_path)
        os.execve(str(BASTION), [str(BASTION), "serve", "--port", "0"], env)  # noqa: S606  a fixed argv
    seen = b""
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ctrl-C" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                seen += os.read(fd, 65536)
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode("utf-8", "replace")
    assert "Ctrl-C" in text, text
    assert re.search(r"Bastion \S+ is serving at http://127\.0\.0\.1:\d+", text)
    assert f"data      {tmp_path / '.bastion'} (SQLite)" in text
    assert "init --owner-email" in text


def test_an_init_and_a_first_serve_at_once_on_a_new_directory_share_one_set_of_secrets(tmp_path: Path) -> None:
    env = _state_env(tmp_path)
    served = _spawn_on_port_0(env, tmp_path)
    try:
        init = run_bastion("init", "--owner-email", "ada@example.com", "--json", env=env, cwd=tmp_path)
        assert init.returncode == 0, init.stderr
        assert json.loads(init.stdout)["owner"]["api_key"].startswith("bsk_")
        _base_url_of(served, env, tmp_path)
        listed = run_bastion("member", "list", "--json", env=env, cwd=tmp_path)
        assert [m["email"] for m in json.loads(listed.stdout)] == ["ada@example.com"]
    finally:
        served.terminate()
        served.wait(timeout=15)
    assert [p.name for p in (tmp_path / ".bastion").iterdir() if p.suffix == ".toml"] == ["bastion.toml"]
