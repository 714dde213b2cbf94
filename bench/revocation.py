"""How soon a disable holds: from an admin's change to the first refused call, and to an open stream's end.

Run with `scripts/bench revocation` or `uv run python bench/revocation.py [--rounds 20] [--database-url URL]`.

What runs, each in its own process on 127.0.0.1: the echo upstream and, on the embedded database, one `bastion
serve` whose host an admin disables with the CLI (a process of its own, as a person would); on PostgreSQL
(``--database-url``) two `bastion serve` replicas, the admin's API call going to the first while the calls and
the listen stream go to the second. Four callers replay the official SDK client's 2026-era `tools/call` without
pause; one agent keeps a `subscriptions/listen` stream open. Each round disables the host, waits for the refusals
and the stream's end, and enables it again. Per round it records:

- the change: how long the CLI command or the API call took (it returns once the change holds everywhere);
- first refusal: from the moment the change was asked for to the start of the first refused call, and from the
  change's commit (its row's ``updated_at``, written by the committing transaction) to that call;
- admitted after: calls started after the change returned that were admitted anyway (should be 0);
- stream ended: from the change returning to the listen stream's end (its JSON-RPC error).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import (  # a sibling script, not a package
    BASTION,
    MODERN,
    Captured,
    Processes,
    _cli,  # pyright: ignore[reportPrivateUsage]
    _free_port,  # pyright: ignore[reportPrivateUsage]
    _wait_ready,  # pyright: ignore[reportPrivateUsage]
    bastion_env,
    capture,
    provision,
    start_upstream,
)

CALLERS: Final = 4
HOST: Final = "bench-agent"


@dataclass(slots=True)
class Round:
    change_ms: float = 0.0
    first_refusal_ms: float = float("nan")
    commit_to_refusal_ms: float = float("nan")
    admitted_after: int = 0
    stream_ended_ms: float = float("nan")


@dataclass(slots=True)
class Calls:
    """Each call's start (monotonic) and whether it was admitted."""

    made: list[tuple[float, bool]] = field(default_factory=list[tuple[float, bool]])
    wall: list[float] = field(default_factory=list[float])  # each call's start, wall clock (same order)
    stop: bool = False


async def _caller(http: httpx2.AsyncClient, captured: Captured, calls: Calls, number: int) -> None:
    sent = 0
    while not calls.stop:
        sent += 1
        body = {**captured.body, "id": number * 1_000_000 + sent}
        started, wall = time.monotonic(), time.time()
        response = await http.post(captured.url, headers=captured.headers, json=body)
        calls.made.append((started, response.status_code == 200))
        calls.wall.append(wall)


async def _listen_until_ended(url: str, token: str, opened: anyio.Event) -> float:
    """Open a listen stream; when it ends (a refusal), the monotonic time it did."""
    try:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http), mode=MODERN, cache=None) as client,  # type: ignore[arg-type]
            client.listen(tools_list_changed=True) as subscription,
        ):
            opened.set()
            async for _event in subscription:
                pass
    except Exception:  # noqa: BLE001, S110  the end this waits for is an error: the access that ended
        pass
    return time.monotonic()


async def _round(change: Any, undo: Any, committed_at: Any, listen_url: str, token: str, calls: Calls) -> Round:
    done = Round()
    opened = anyio.Event()
    ended_at: list[float] = []

    async def listen() -> None:
        ended_at.append(await _listen_until_ended(listen_url, token, opened))

    asked = answered = 0.0
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:  # ends once the listen stream has
            tasks.start_soon(listen)
            await opened.wait()
            await anyio.sleep(0.2)  # calls admitted as usual for a moment
            asked = time.monotonic()
            await change()
            answered = time.monotonic()
    done.change_ms = (answered - asked) * 1000
    done.stream_ended_ms = (ended_at[0] - answered) * 1000
    await anyio.sleep(0.2)
    refused = [i for i, (start, admitted) in enumerate(calls.made) if start >= asked and not admitted]
    if refused:
        done.first_refusal_ms = (calls.made[refused[0]][0] - asked) * 1000
        # The change's commit: its row's updated_at, written in the committing transaction (so a little early).
        done.commit_to_refusal_ms = (calls.wall[refused[0]] - await committed_at()) * 1000
    enable_at = time.monotonic()
    done.admitted_after = sum(1 for start, admitted in calls.made if answered <= start < enable_at and admitted)
    await undo()
    await anyio.sleep(0.2)
    return done


async def measure(
    rounds: int, admin: dict[str, Any], captured: Captured, listen_url: str, token: str
) -> tuple[list[Round], int]:
    calls = Calls()
    results: list[Round] = []

    async def change() -> None:
        await admin["disable"]()

    async def undo() -> None:
        await admin["enable"]()

    async with httpx2.AsyncClient(timeout=30) as http, anyio.create_task_group() as tasks:
        for number in range(CALLERS):
            tasks.start_soon(_caller, http, captured, calls, number)
        for index in range(rounds):
            results.append(await _round(change, undo, admin["committed_at"], listen_url, token, calls))
            print(f"  round {index + 1}/{rounds}", file=sys.stderr, flush=True)  # noqa: T201
        calls.stop = True
    return results, len(calls.made)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _summary(values: list[float]) -> str:
    kept = [v for v in values if not math.isnan(v)]  # NaN: not seen
    if not kept:
        return "-"
    return f"{statistics.median(kept):7.1f} {max(kept):7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--database-url", help="PostgreSQL: two replicas on it (default: embedded SQLite, one serve)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-revocation-"))
    processes = Processes()
    try:
        _upstream, upstream_url = start_upstream(processes, tmp)
        env = bastion_env(tmp, args.database_url)
        env["BASTION_WARM_CLI"] = "false"  # the admin's CLI runs as a process of its own, cold
        token = provision(env, upstream_url, tmp)
        bases: list[str] = []
        for replica in range(2 if args.database_url else 1):
            port, log = _free_port(), tmp / f"bastion-{replica}.log"
            child = processes.start([str(BASTION), "serve", "--host", "127.0.0.1", "--port", str(port)], env, log)
            bases.append(f"http://127.0.0.1:{port}")
            _wait_ready(child, f"{bases[-1]}/readyz", log)
        admin: dict[str, Any]
        if args.database_url:
            _cli(env, "member", "create", "admin@example.com", "--role", "owner")
            key = _cli(env, "apikey", "create", "--member", "admin@example.com", "--name", "bench")["secret"]
            api = httpx2.AsyncClient(base_url=f"{bases[0]}/api/v1", headers={"Authorization": f"Bearer {key}"})

            async def api_call(path: str) -> None:
                (await api.post(path)).raise_for_status()

            async def api_committed_at() -> float:
                return _epoch((await api.get(f"/hosts/{HOST}")).json()["updated_at"])

            admin = {
                "how": "API call to replica A; calls and stream on replica B",
                "committed_at": api_committed_at,
                "disable": lambda: api_call(f"/hosts/{HOST}/disable"),
                "enable": lambda: api_call(f"/hosts/{HOST}/enable"),
            }
        else:

            async def cli(*words: str) -> None:
                ran = await anyio.run_process([str(BASTION), *words], env=env, check=False)
                if ran.returncode != 0:
                    raise SystemExit(f"bastion {' '.join(words)} failed: {ran.stderr.decode()}")

            async def cli_committed_at() -> float:
                ran = await anyio.run_process([str(BASTION), "host", "show", HOST, "--json"], env=env)
                return _epoch(json.loads(ran.stdout)["updated_at"])

            admin = {
                "how": "`bastion host disable` (a CLI process); calls and stream on the one serve",
                "committed_at": cli_committed_at,
                "disable": lambda: cli("host", "disable", HOST),
                "enable": lambda: cli("host", "enable", HOST),
            }
        url = f"{bases[-1]}/g/bench/mcp"

        async def run() -> tuple[list[Round], int]:
            captured = await capture(url, "echo__echo", MODERN, "warm-up", token)
            return await measure(args.rounds, admin, captured, url, token)

        results, total = anyio.run(run)
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    database = (args.database_url or "sqlite (embedded)").split(":", 1)[0].split("+", 1)[0]
    if args.json:
        doc = {"database": database, "how": admin["how"], "calls": total, "rounds": [asdict(r) for r in results]}
        print(json.dumps(doc, indent=2))  # noqa: T201
        return
    print(f"host disable, {args.rounds} rounds, database {database}: {admin['how']}")  # noqa: T201
    print(f"{'':34} {'median':>7} {'max':>7}")  # noqa: T201
    print(f"{'the change took (ms)':34} {_summary([r.change_ms for r in results])}")  # noqa: T201
    print(f"{'asked → first refused call (ms)':34} {_summary([r.first_refusal_ms for r in results])}")  # noqa: T201
    commits = [r.commit_to_refusal_ms for r in results]
    print(f"{'committed → first refused call (ms)':34} {_summary(commits)}")  # noqa: T201
    print(f"{'returned → listen stream ended (ms)':34} {_summary([r.stream_ended_ms for r in results])}")  # noqa: T201
    print(f"calls admitted after the change returned: {sum(r.admitted_after for r in results)}")  # noqa: T201
    print(f"calls made: {total} by {CALLERS} callers without pause")  # noqa: T201


if __name__ == "__main__":
    main()
