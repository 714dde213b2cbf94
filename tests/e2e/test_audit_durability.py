"""The audit log and the real `bastion serve` process: kill -9 loses no event of a forwarded call; SIGTERM drains."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest

from tests.mcp_support import Recorder, gateway_client, recording_upstream
from tests.mcp_support import serving as serving_app
from tests.processes import HEAVY_TIMEOUT_S, clean_env, run_bastion, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]
CREDENTIAL = "ada-durable-upstream-credential"


def _cli(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    done = run_bastion(*args, "--json", env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return parsed


def _provision(env: dict[str, str], cwd: Path, upstream: str) -> str:
    """An operator's setup through the CLI; the member's access token."""
    assert run_bastion("init", env=env, cwd=cwd).returncode == 0
    _cli(env, cwd, "server", "create", "crm", "--url", upstream, "--auth-kind", "bearer")
    _cli(env, cwd, "gateway", "create", "sales", "--server", "crm")
    _cli(env, cwd, "host", "create", "agent")
    _cli(env, cwd, "member", "create", "ada@example.com")
    secret_file = cwd / "credential"
    secret_file.write_text(CREDENTIAL, encoding="utf-8")
    _cli(
        env,
        cwd,
        "identity",
        "create",
        "--server",
        "crm",
        "--member",
        "ada@example.com",
        "--bearer-token-file",
        str(secret_file),
    )
    token: str = _cli(
        env, cwd, "connection", "create", "--member", "ada@example.com", "--host", "agent", "--gateway", "sales"
    )["secret"]
    return token


async def _refuses_new_connections(base_url: str) -> None:
    while True:
        try:
            async with httpx2.AsyncClient(base_url=base_url, timeout=5) as fresh:
                await fresh.get("/healthz")
        except (httpx2.ConnectError, httpx2.ReadError, httpx2.RemoteProtocolError):
            # Refused outright, or reset from the backlog of a listener that has just closed: not served either way.
            return
        await anyio.sleep(0.05)


def _call_events(data_dir: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(data_dir / "bastion.db") as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM audit_events WHERE method = 'tools/call' ORDER BY occurred_at").fetchall()
    return [dict(row) for row in rows]


async def test_kill_9_mid_call_leaves_the_event_written_and_the_next_start_seals_it_as_interrupted(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    env = clean_env(BASTION_DATA_DIR=str(tmp_path / "data"), BASTION_LOG_LEVEL="warning")
    async with serving_app(recording_upstream(recorder)) as upstream:
        token = await anyio.to_thread.run_sync(_provision, env, tmp_path, f"{upstream}/mcp")
        with serving(env, tmp_path) as server:
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    # The gateway is killed under this call: how the client fails is not what is tested here.
                    with contextlib.suppress(Exception):
                        async with gateway_client(f"{server.base_url}/g/sales/mcp", token, "2026-07-28") as client:
                            await client.call_tool("crm__wait", {"note": "in flight"})

                tg.start_soon(call)
                with anyio.fail_after(20):
                    await recorder.arrived.wait()  # the call reached the upstream
                server.process.send_signal(signal.SIGKILL)
                await anyio.to_thread.run_sync(server.process.wait)
                tg.cancel_scope.cancel()
        # Nothing could be flushed after kill -9; the event was written before the upstream was called.
        [pending] = _call_events(tmp_path / "data")
        assert (pending["seq"], pending["outcome"], pending["actor"], pending["name"]) == (
            None,
            "pending",
            "ada@example.com",
            "crm__wait",
        )
        # The next start finds it stale (here at once) and seals it into the chain as interrupted.
        with serving({**env, "BASTION_AUDIT_STALE_AFTER_S": "0.001"}, tmp_path):
            pass  # recovery runs before the server reports healthy
        recorder.release.set()
    [sealed] = _call_events(tmp_path / "data")
    assert sealed["outcome"] == "interrupted" and sealed["seq"] is not None
    verified = await anyio.to_thread.run_sync(lambda: run_bastion("audit", "verify", env=env, cwd=tmp_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_sigterm_lets_in_flight_calls_finish_and_flushes_every_event_before_exit(tmp_path: Path) -> None:
    recorder = Recorder()
    env = clean_env(BASTION_DATA_DIR=str(tmp_path / "data"), BASTION_LOG_LEVEL="warning")
    async with serving_app(recording_upstream(recorder)) as upstream:
        token = await anyio.to_thread.run_sync(_provision, env, tmp_path, f"{upstream}/mcp")
        with serving(env, tmp_path) as server:
            url = f"{server.base_url}/g/sales/mcp"
            answers: list[str] = []
            async with gateway_client(url, token, "2026-07-28") as client:
                for i in range(10):
                    echoed = await client.call_tool("crm__echo", {"text": str(i)})
                    answers.append(echoed.content[0].text)  # type: ignore[union-attr]
                async with anyio.create_task_group() as tg:

                    async def held() -> None:
                        result = await client.call_tool("crm__wait", {})
                        answers.append(result.content[0].text)  # type: ignore[union-attr]

                    tg.start_soon(held)
                    with anyio.fail_after(20):
                        await recorder.arrived.wait()
                    server.process.send_signal(signal.SIGTERM)
                    # Draining: new connections are refused while the held call is still out at the upstream.
                    with anyio.fail_after(20):
                        await _refuses_new_connections(server.base_url)
                    assert not recorder.release.is_set() and answers == [str(i) for i in range(10)]
                    recorder.release.set()  # the upstream answers while the gateway drains
            code = await anyio.to_thread.run_sync(lambda: server.process.wait(timeout=30))
    assert code == 0
    assert answers == [str(i) for i in range(10)] + ["released"]
    events = _call_events(tmp_path / "data")
    assert len(events) == 11
    assert all(e["seq"] is not None and e["outcome"] == "ok" for e in events)
    verified = await anyio.to_thread.run_sync(lambda: run_bastion("audit", "verify", env=env, cwd=tmp_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
