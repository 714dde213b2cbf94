"""Calls under admin churn: what callers see while an admin edits servers and identities every 150 ms.

Run with `scripts/bench churn` or `uv run python bench/churn.py [--seconds 10] [--database-url URL] [--json]`.

What runs, each in its own process on 127.0.0.1: the echo upstream (`bench/echo_upstream.py`) taking 50 ms a
call, and `bastion serve` provisioned through the CLI as `bench/gateway.py` does (a 2026-era and a
handshake-era server behind one gateway, the member's own bearer identity for each). Twelve callers replay the
official SDK client's `tools/call` (captured once per era; handshake-era callers each on a session of their own)
for ``--seconds`` per case while the admin API makes one kind of edit every 150 ms:

- ``none``: no edits (the baseline);
- ``server description``: a description-only edit of the server the calls go to;
- ``identity, same token``: the member's identity given the same bearer token again;
- ``identity label``: the identity relabelled;
- ``server timeout``: the server's call timeout changed, an edit of how it is reached (its sessions close).

Every answer is sorted: ok (a result), HTTP 500, dropped (the connection ended without an answer), another HTTP
status, or a JSON-RPC error (by code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import (  # a sibling script, not a package
    BASTION,
    LEGACY,
    MODERN,
    Captured,
    Processes,
    _cli,  # pyright: ignore[reportPrivateUsage]
    _free_port,  # pyright: ignore[reportPrivateUsage]
    _wait_ready,  # pyright: ignore[reportPrivateUsage]
    bastion_env,
    capture,
    open_sessions,
    provision,
    start_upstream,
)

CALLERS: Final = 12
UPSTREAM_DELAY_MS: Final = 50
EDIT_EVERY_S: Final = 0.15
TOOLS: Final = {MODERN: "echo__echo", LEGACY: "echolegacy__echo"}
SERVERS: Final = {MODERN: "echo", LEGACY: "echolegacy"}
CREDENTIAL: Final = "ada-own-upstream-credential"  # what bench/gateway.py's provisioning gives Ada


@dataclass(slots=True)
class Case:
    era: str
    edit: str
    edits: int = 0
    calls: int = 0
    ok: int = 0
    http_500: int = 0
    dropped: int = 0
    other_http: Counter[int] = field(default_factory=Counter[int])
    jsonrpc_errors: Counter[int] = field(default_factory=Counter[int])

    def row(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["other_http"] = dict(self.other_http)
        doc["jsonrpc_errors"] = dict(self.jsonrpc_errors)
        return doc


def _answer(response: httpx2.Response) -> dict[str, Any] | None:
    """The JSON-RPC response in a JSON or SSE body (the last message carrying an id)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        doc: dict[str, Any] = response.json()
        return doc
    found: dict[str, Any] | None = None
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip():  # priming events carry no data
            message = json.loads(line[5:])
            if "id" in message and ("result" in message or "error" in message):
                found = message
    return found


async def _caller(
    http: httpx2.AsyncClient, captured: Captured, session: str | None, case: Case, until: float, number: int
) -> None:
    headers = dict(captured.headers)
    if session:
        headers["mcp-session-id"] = session
    sent = 0
    while time.monotonic() < until:
        sent += 1
        body = {**captured.body, "id": number * 1_000_000 + sent}
        body["params"] = {**captured.body["params"], "arguments": {"text": f"c{number}-{sent}"}}
        case.calls += 1
        try:
            response = await http.post(captured.url, headers=headers, json=body)
        except httpx2.TransportError:
            case.dropped += 1  # the connection ended without an answer (a crash mid-response)
            continue
        if response.status_code == 500:
            case.http_500 += 1
            continue
        if response.status_code != 200:
            case.other_http[response.status_code] += 1
            continue
        answer = _answer(response)
        if answer is None:
            case.other_http[-1] += 1  # 200 without a response: counted apart
        elif "error" in answer:
            case.jsonrpc_errors[int(answer["error"]["code"])] += 1
        else:
            case.ok += 1


Edit = Callable[[httpx2.AsyncClient, int], Awaitable[httpx2.Response]]


def _edits(identity_id: str, server: str) -> dict[str, Edit | None]:
    async def description(api: httpx2.AsyncClient, n: int) -> httpx2.Response:
        return await api.patch(f"/servers/{server}", json={"description": f"edit {n}"})

    async def same_token(api: httpx2.AsyncClient, _n: int) -> httpx2.Response:
        return await api.patch(f"/identities/{identity_id}", json={"token": CREDENTIAL})

    async def label(api: httpx2.AsyncClient, n: int) -> httpx2.Response:
        return await api.patch(f"/identities/{identity_id}", json={"label": f"Ada's, edit {n}"})

    async def timeout(api: httpx2.AsyncClient, n: int) -> httpx2.Response:
        return await api.patch(f"/servers/{server}", json={"call_timeout_s": 30 + n % 2})

    return {
        "none": None,
        "server description": description,
        "identity, same token": same_token,
        "identity label": label,
        "server timeout": timeout,
    }


async def run_case(captured: Captured, api: httpx2.AsyncClient, case: Case, edit: Edit | None, seconds: float) -> None:
    sessions: list[str | None] = (
        list(await open_sessions(captured, CALLERS)) if captured.handshake else [None] * CALLERS
    )
    until = time.monotonic() + seconds
    limits = httpx2.Limits(max_connections=CALLERS + 4)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as http, anyio.create_task_group() as tasks:
        for number, session in enumerate(sessions):
            tasks.start_soon(_caller, http, captured, session, case, until, number)
        while edit is not None and time.monotonic() < until:
            done = await edit(api, case.edits)
            if done.status_code >= 300:
                raise SystemExit(f"the edit failed: {done.status_code} {done.text[:300]}")
            case.edits += 1
            await anyio.sleep(EDIT_EVERY_S)


async def measure(gateway_url: str, api_url: str, api_key: str, token: str, seconds: float) -> list[Case]:
    cases: list[Case] = []
    async with httpx2.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as api:
        listed = (await api.get("/identities", params={"member": "ada@example.com"})).json()["items"]
        for era in (MODERN, LEGACY):
            captured = await capture(gateway_url, TOOLS[era], era, "warm-up", token)
            server = SERVERS[era]
            server_id = (await api.get(f"/servers/{server}")).json()["id"]
            identity_id = next(i["id"] for i in listed if i["server_id"] == server_id)
            for name, edit in _edits(identity_id, server).items():
                case = Case(era, name)
                await run_case(captured, api, case, edit, seconds)
                cases.append(case)
                print(f"  {era:10} {name:22} {case.calls:6} calls", file=sys.stderr, flush=True)  # noqa: T201
    return cases


def table(cases: list[Case]) -> str:
    lines = [
        f"{'era':10} {'edit':22} {'edits':>5} {'calls':>6} {'ok':>6} {'HTTP 500':>8} {'dropped':>7} {'other HTTP':>10}"
        "  JSON-RPC errors",
    ]
    for c in cases:
        other = sum(c.other_http.values())
        errors = ", ".join(f"{n} x {code}" for code, n in sorted(c.jsonrpc_errors.items())) or "0"
        counts = f"{c.edits:5} {c.calls:6} {c.ok:6} {c.http_500:8} {c.dropped:7} {other:10}"
        lines.append(f"{c.era:10} {c.edit:22} {counts}  {errors}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per case")
    parser.add_argument("--database-url", help="BASTION_DATABASE_URL for Bastion (default: embedded SQLite)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-churn-"))
    processes = Processes()
    try:
        gw_port = _free_port()
        _upstream, upstream_url = start_upstream(processes, tmp, UPSTREAM_DELAY_MS)
        env = bastion_env(tmp, args.database_url)
        token = provision(env, upstream_url, tmp)
        _cli(env, "member", "create", "admin@example.com", "--role", "owner")
        api_key = _cli(env, "apikey", "create", "--member", "admin@example.com", "--name", "churn")["secret"]
        log = tmp / "bastion.log"
        bastion = processes.start([str(BASTION), "serve", "--host", "127.0.0.1", "--port", str(gw_port)], env, log)
        base = f"http://127.0.0.1:{gw_port}"
        _wait_ready(bastion, f"{base}/readyz", log)
        cases = anyio.run(measure, f"{base}/g/bench/mcp", f"{base}/api/v1", api_key, token, args.seconds)
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    database = (args.database_url or "sqlite (embedded)").split(":", 1)[0].split("+", 1)[0]
    if args.json:
        doc = {"database": database, "callers": CALLERS, "cases": [c.row() for c in cases]}
        print(json.dumps(doc, indent=2))  # noqa: T201
        return
    print(  # noqa: T201
        f"tools/call under admin churn: {CALLERS} callers, upstream {UPSTREAM_DELAY_MS} ms a call, an edit every "
        f"{EDIT_EVERY_S * 1000:.0f} ms, {args.seconds:g} s per case, database {database}"
    )
    print(table(cases))  # noqa: T201


if __name__ == "__main__":
    main()
