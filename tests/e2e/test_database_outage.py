"""PostgreSQL dies under load and comes back: `bastion serve` refuses fail-closed, says it is not ready while staying
alive, recovers without a restart, and no call reaches the upstream without its audit event.

The test starts a PostgreSQL cluster of its own (initdb, pg_ctl) so that it can stop it at will: `-m immediate`,
as a crashed server or a failover looks to its clients.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import httpx2
import psycopg
import pytest

from bastion.settings import generate_secrets
from tests.e2e.test_audit_durability import _provision
from tests.mcp_support import Recorder, recording_upstream
from tests.mcp_support import serving as serving_app
from tests.processes import HEAVY_TIMEOUT_S, clean_env, free_port, run_bastion, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]
BINARIES: Final = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
BOUND_S: Final = 60  # an upper bound on each wait below, never a timing
CALLERS: Final = 4
WARM_CALLS: Final = 20
HEADERS: Final = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "crm__echo",
}


class Cluster:
    """A PostgreSQL cluster of the test's own on a free port, run as `postgres` when the test runs as root."""

    def __init__(self) -> None:
        # Its own directory under /tmp: the test's is not reachable by another user.
        self.data = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._bin = BINARIES[-1]
        self._user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            self._user = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self.data, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str) -> None:
        command = [*self._user, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=BOUND_S, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def init(self) -> None:
        self._run(str(self._bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.data / "log"), "-w",
                  "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop_if_running(self) -> None:
        subprocess.run(  # our own cluster, whatever state the test left it in
            [*self._user, str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=BOUND_S,
            check=False,
        )


@contextmanager
def _cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop_if_running()
        shutil.rmtree(cluster.data, ignore_errors=True)


def _call(text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": "crm__echo",
            "arguments": {"text": text},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }


async def _no_call_pending(url: str) -> None:
    query = "SELECT count(*) FROM audit_events WHERE method = 'tools/call' AND seq IS NULL"
    async with await psycopg.AsyncConnection.connect(url.replace("+psycopg", ""), autocommit=True) as db:
        while True:
            row = await (await db.execute(query)).fetchone()
            if row is not None and row[0] == 0:
                return
            await anyio.sleep(0.1)


async def _readiness_becomes(http: httpx2.AsyncClient, status: int) -> None:
    while True:
        if (await http.get("/readyz")).status_code == status:
            return
        await anyio.sleep(0.05)


def _outcome(response: httpx2.Response) -> str:
    """What a call got: "ok", or its refusal as an HTTP status or a JSON-RPC error code."""
    if response.status_code != 200:
        return f"http {response.status_code}"
    text = response.text
    answer = json.loads(text[text.index("{") : text.rindex("}") + 1])
    return "ok" if "result" in answer else f"jsonrpc {answer['error']['code']}"


async def test_a_database_outage_under_load_is_refused_fail_closed_and_recovered_without_a_restart(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    with _cluster() as cluster:
        env = clean_env(
            BASTION_DATA_DIR=str(tmp_path / "data"),
            BASTION_DATABASE_URL=cluster.url,
            BASTION_LOG_LEVEL="warning",
            **{f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()},
        )
        async with serving_app(recording_upstream(recorder)) as upstream:
            token = await anyio.to_thread.run_sync(_provision, env, tmp_path, f"{upstream}/mcp")
            with serving(env, tmp_path) as server:
                outcomes: dict[str, str] = {}  # each call's text: what its caller got
                phase = {"now": "before"}
                by_phase: dict[str, Counter[str]] = {"before": Counter(), "down": Counter(), "after": Counter()}
                warmed, seen_down, seen_back = anyio.Event(), anyio.Event(), anyio.Event()
                stop = anyio.Event()

                async def caller(n: int, http: httpx2.AsyncClient) -> None:
                    i = 0
                    while not stop.is_set():
                        text, i = f"caller {n} call {i}", i + 1
                        headers = {**HEADERS, "Authorization": f"Bearer {token}"}
                        try:
                            response = await http.post("/g/sales/mcp", json=_call(text), headers=headers)
                            outcome = _outcome(response)
                        except httpx2.TransportError as exc:
                            outcome = f"transport {type(exc).__name__}"
                        outcomes[text] = outcome
                        by_phase[phase["now"]][outcome] += 1
                        if phase["now"] == "before" and by_phase["before"]["ok"] >= WARM_CALLS:
                            warmed.set()
                        if phase["now"] == "down" and outcome != "ok":
                            seen_down.set()
                        if phase["now"] == "after" and outcome == "ok":
                            seen_back.set()

                async with (
                    httpx2.AsyncClient(base_url=server.base_url, timeout=30) as http,
                    anyio.create_task_group() as tg,
                ):
                    for n in range(CALLERS):
                        tg.start_soon(caller, n, http)
                    with anyio.fail_after(BOUND_S):
                        await warmed.wait()
                    phase["now"] = "down"
                    await anyio.to_thread.run_sync(cluster.stop)
                    with anyio.fail_after(BOUND_S):
                        await seen_down.wait()
                        await _readiness_becomes(http, 503)
                    ready = await http.get("/readyz")
                    assert ready.json()["checks"]["database"] is False
                    assert (await http.get("/healthz")).status_code == 200  # alive: no restart wanted
                    calls_while_down = len(recorder.tool_calls)

                    phase["now"] = "after"
                    await anyio.to_thread.run_sync(cluster.start)
                    with anyio.fail_after(BOUND_S):
                        await seen_back.wait()
                        await _readiness_becomes(http, 200)
                    stop.set()
                # The seals held through the outage are written once the database is back, without a stop.
                with anyio.fail_after(BOUND_S):
                    await _no_call_pending(cluster.url)
                # A clean stop flushes every seal this process holds.
                assert await anyio.to_thread.run_sync(server.terminate, BOUND_S) == 0
            # The gateway has stopped (SIGTERM): everything it held for the audit log is written.

        down = by_phase["down"]
        # Fail-closed: while the database was away, a call was answered (a cache still holding) or refused with
        # 503 or the audit log's own error, never a dropped connection or a 500.
        assert set(down) <= {"ok", "http 503", "jsonrpc -32053"}, by_phase
        assert down["http 503"] + down["jsonrpc -32053"] > 0, by_phase
        assert by_phase["after"]["ok"] > 0, by_phase
        assert all(not o.startswith("transport") for o in outcomes.values()), by_phase

        # No call reached the upstream without its audit event, and every call answered ok has one.
        reached = {c.arguments["text"] for c in recorder.tool_calls}
        with psycopg.connect(cluster.url.replace("+psycopg", "")) as db:
            rows = db.execute(
                "SELECT args_preview, outcome FROM audit_events WHERE method = 'tools/call' AND seq IS NOT NULL"
            ).fetchall()
        audited = {json.loads(preview)["text"]: outcome for preview, outcome in rows if preview}
        assert reached <= set(audited), sorted(reached - set(audited))[:5]
        answered = {text for text, outcome in outcomes.items() if outcome == "ok"}
        assert answered <= reached
        assert all(audited[text] == "ok" for text in answered)
        assert len(recorder.tool_calls) >= calls_while_down
        verified = await anyio.to_thread.run_sync(lambda: run_bastion("audit", "verify", env=env, cwd=tmp_path))
        assert verified.returncode == 0, verified.stdout + verified.stderr
