"""`tools/call` throughput and latency, directly against an upstream and through Bastion, with `wrk`.

Run with `scripts/bench gateway` or `uv run python bench/gateway.py [--duration 10] [--json]`.

What runs, each in its own process on 127.0.0.1: the echo upstream and `bastion serve` on a fresh data directory
(embedded SQLite unless `--database-url` names another database), provisioned through the CLI the way an operator
would: a server with bearer auth, a gateway, a host, a member, the member's identity sealed in the real vault and a
connection whose minted `bst_` token every request carries. `--rules` adds what a real deployment has: a policy
rule, a rate limit and a content rule, none of which refuses or rewrites the benchmark's calls.

The upstream is a bare ASGI echo (`bench/raw_upstream.py`) so that the benchmark measures Bastion, not its upstream;
`--upstream sdk` uses the official SDK's low-level Server instead (`bench/echo_upstream.py`), which saturates a core
far below what Bastion relays. The upstream's CPU is printed beside every figure, and a ratio is not reported when
the upstream was at or above 90 % of a core while Bastion was in front of it: it would measure the upstream.

The requests are the official SDK client's own: one `tools/call` is captured per target (headers and body, through
an httpx2 request hook) and replayed by a generated wrk Lua script with a fresh JSON-RPC id per request. The modern
era (2026-07-28) is stateless single POSTs; the legacy era (2025-11-25) replays the SDK's initialize handshake once
per wrk connection and spreads the calls over those sessions. Every response is checked: status 200 and the echoed
text, else it is counted and shown.

`--profile FILE` samples the gateway with py-spy during the modern-era run at the highest concurrency, writes the
collapsed stacks to FILE and prints where the gateway's time went (own time and inclusive time per function).

Targets on a 2-core machine, audit on and rules configured: through Bastion at least 15 % of direct throughput at
c=64 (12 % on PostgreSQL), at most 0.5 ms added p50 at c=1 (2 ms on PostgreSQL), gateway RSS at most 120 MB idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

BENCH_DIR: Final = Path(__file__).resolve().parent
BASTION: Final = Path(sys.executable).with_name("bastion")
START_TIMEOUT_S: Final = 60.0
WRK_TIMEOUT_S: Final = 10
RSS_SAMPLE_INTERVAL_S: Final = 0.1
TARGETS: Final = {  # database: (ratio of direct at c=64, added p50 ms at c=1)
    "sqlite": (0.15, 0.5),
    "postgresql": (0.12, 2.0),
}
TARGET_IDLE_RSS_MB: Final = 120.0
SATURATED_CPU_PERCENT: Final = 90.0  # an upstream this busy is what a run measured
PROFILE_RATE_HZ: Final = 250
UPSTREAMS: Final = {"raw": "raw_upstream.py", "sdk": "echo_upstream.py"}
MODERN: Final = "2026-07-28"
LEGACY: Final = "legacy"
# Headers wrk sets itself (Host, Content-Length) or that describe one connection rather than the request.
_NOT_REPLAYED: Final = frozenset({"host", "content-length", "connection"})
_ID_SLOT: Final = 987654321987654321


@dataclass(frozen=True, slots=True)
class Captured:
    """One `tools/call` as the official SDK client sent it, and the handshake that preceded it (legacy only)."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    handshake: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list[tuple[dict[str, str], Any]])


@dataclass(slots=True)
class Run:
    target: str
    era: str
    concurrency: int
    requests: int
    seconds: float
    ok: int
    bad_status: int
    bad_body: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    gateway_cpu_percent: float
    upstream_cpu_percent: float
    rss_peak_mb: float | None = None
    bad_sample: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# --- processes ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Every child this benchmark starts; all of them are stopped on exit, whatever happened."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            child = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self._children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self._children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _wait_ready(child: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx2.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise SystemExit(f"{child.args} exited with {child.returncode}:\n{log.read_text(encoding='utf-8')}")
            try:
                if client.get(url).status_code < 500:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {START_TIMEOUT_S} s")


def start_upstream(
    processes: Processes, tmp: Path, delay_ms: float = 0.0, kind: str = "sdk"
) -> tuple[subprocess.Popen[bytes], str]:
    """The echo upstream of ``kind`` (see ``UPSTREAMS``; each call taking ``delay_ms``), answering; its process and
    MCP URL."""
    port, log = _free_port(), tmp / "upstream.log"
    args = [sys.executable, str(BENCH_DIR / UPSTREAMS[kind]), str(port)] + ([str(delay_ms)] if delay_ms else [])
    upstream = processes.start(args, {**os.environ}, log)
    url = f"http://127.0.0.1:{port}/mcp"
    _wait_ready(upstream, url, log)
    return upstream, url


def bastion_env(tmp: Path, database_url: str | None) -> dict[str, str]:
    """The environment every `bastion` command of a benchmark runs with: a fresh data directory under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_DATA_DIR"] = str(tmp / "data")
    env["BASTION_OUTBOUND_ALLOW_LOOPBACK"] = "true"  # the echo upstream listens on http://127.0.0.1
    if database_url:
        env["BASTION_DATABASE_URL"] = database_url
    return env


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(  # noqa: S603
        [str(BASTION), *args, "--json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"bastion {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def provision(env: dict[str, str], upstream_url: str, tmp: Path) -> str:
    """An operator's setup through the CLI; returns the connection's access token."""
    _cli(env, "init")
    for name, era in (("echo", "modern"), ("echolegacy", "legacy")):
        _cli(env, "server", "create", name, "--url", upstream_url, "--auth-kind", "bearer", "--era", era)
    _cli(env, "gateway", "create", "bench", "--server", "echo", "--server", "echolegacy")
    _cli(env, "host", "create", "bench-agent")
    _cli(env, "member", "create", "ada@example.com")
    credential = tmp / "ada-upstream-credential"
    credential.write_text("ada-own-upstream-credential", encoding="utf-8")
    for name in ("echo", "echolegacy"):
        _cli(
            env,
            "identity",
            "create",
            "--server",
            name,
            "--member",
            "ada@example.com",
            "--bearer-token-file",
            str(credential),
        )
    doc = _cli(
        env, "connection", "create", "--member", "ada@example.com", "--host", "bench-agent", "--gateway", "bench"
    )
    token: str = doc["secret"]
    return token


def add_rules(env: dict[str, str]) -> None:
    """Rules a real deployment has, none of which refuses or rewrites the benchmark's calls: a deny for another
    member, a rate limit far above what the benchmark sends and a content rule that redacts card numbers."""
    _cli(env, "member", "create", "bob@example.com")
    _cli(env, "policy", "add", "--effect", "deny", "--subject-kind", "member", "--subject", "bob@example.com")
    _cli(env, "rate-limit", "add", "--per", "member", "--limit", "1000000/1s")
    _cli(env, "content-rule", "add", "card-numbers", "--pattern", r"\b(?:\d[ -]?){13,16}\b", "--action", "redact")


# --- the SDK client's requests ------------------------------------------------------------------------------------


async def capture(url: str, tool: str, mode: str, marker: str, token: str | None) -> Captured:
    """Call ``tool`` once with the official SDK client and keep what it put on the wire."""
    sent: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def record(request: httpx2.Request) -> None:
        if request.method == "POST":
            sent.append((dict(request.headers), json.loads(request.content)))

    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=auth, timeout=30, event_hooks={"request": [record]}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client,  # type: ignore[arg-type]
    ):
        result = await client.call_tool(tool, {"text": marker})
        text = getattr(result.content[0], "text", None)
        if text != marker:
            raise SystemExit(f"{url}: {tool} answered {result!r}, not the echo")
    calls = [(h, b) for h, b in sent if b.get("method") == "tools/call"]
    handshake = [(h, b) for h, b in sent if b.get("method") in ("initialize", "notifications/initialized")]
    headers = {k: v for k, v in calls[0][0].items() if k.lower() not in _NOT_REPLAYED}
    headers.pop("mcp-session-id", None)
    return Captured(url, headers, calls[0][1], handshake if mode == LEGACY else [])


async def open_sessions(captured: Captured, count: int) -> list[str]:
    """Replay the SDK's legacy handshake ``count`` times; the session ids it was given."""

    async def one(http: httpx2.AsyncClient) -> str:
        session = ""
        for headers, body in captured.handshake:
            sent = {k: v for k, v in headers.items() if k.lower() not in _NOT_REPLAYED}
            if session:
                sent["mcp-session-id"] = session
            async with http.stream("POST", captured.url, headers=sent, json=body) as response:
                await response.aread()
                if response.status_code >= 300:
                    raise SystemExit(f"handshake refused: {response.status_code} {response.text[:300]}")
                session = session or response.headers["mcp-session-id"]
        return session

    async with httpx2.AsyncClient(timeout=30) as http:
        return [await one(http) for _ in range(count)]


# --- wrk ------------------------------------------------------------------------------------------------------------

_LUA: Final = r"""
local prefix = [==[%(prefix)s]==]
local suffix = [==[%(suffix)s]==]
local expected = [==[%(expected)s]==]
local headers = {%(headers)s}
local sessions = {%(sessions)s}
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  ok, bad_status, bad_body, bad_sample, nthreads = 0, 0, 0, "", %(threads)d
end

function request()
  counter = counter + 1
  if #sessions > 0 then
    headers["mcp-session-id"] = sessions[((counter * nthreads + tid) %% #sessions) + 1]
  end
  return wrk.format("POST", nil, headers, prefix .. (tid * 1000000000 + counter) .. suffix)
end

function response(status, hdrs, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    if bad_sample == "" then bad_sample = status .. " " .. string.sub(body or "", 1, 300) end
  elseif string.find(body, expected, 1, true) == nil or string.find(body, '"isError":true', 1, true) then
    bad_body = bad_body + 1
    if bad_sample == "" then bad_sample = "200 " .. string.sub(body or "", 1, 300) end
  else
    ok = ok + 1
  end
end

function done(summary, latency, requests)
  local good, status, body, sample = 0, 0, 0, ""
  for _, t in ipairs(threads) do
    good = good + t:get("ok")
    status = status + t:get("bad_status")
    body = body + t:get("bad_body")
    if sample == "" then sample = t:get("bad_sample") end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%%d,"duration_us":%%d,"ok":%%d,"bad_status":%%d,"bad_body":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\n',
    summary.requests, summary.duration, good, status, body, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0), latency.max))
  io.write("BENCH_SAMPLE " .. string.gsub(sample, "[\r\n]", " ") .. "\n")
end
"""


def _lua_string(value: str) -> str:
    if "]==]" in value:
        raise ValueError("value cannot be embedded in a Lua long string")
    return value


def lua_script(captured: Captured, marker: str, sessions: list[str], threads: int) -> str:
    body = {**captured.body, "id": _ID_SLOT}
    prefix, suffix = json.dumps(body, separators=(",", ":")).split(str(_ID_SLOT))
    headers = ", ".join(f'["{k}"] = [==[{_lua_string(v)}]==]' for k, v in captured.headers.items())
    return _LUA % {
        "prefix": _lua_string(prefix),
        "suffix": _lua_string(suffix),
        "expected": f'"text":"{marker}"',
        "headers": headers,
        "sessions": ", ".join(f'"{s}"' for s in sessions),
        "threads": threads,
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def rss_peak(pid: int) -> Generator[list[int], None, None]:
    """Samples VmRSS of ``pid`` while the block runs; the list holds the peak in kB afterwards."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb(pid, "VmRSS"))
            stop.wait(RSS_SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _status_kb(pid, "VmRSS"))


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk); scripts/bench installs it")
    return found


def wrk(script: Path, url: str, concurrency: int, seconds: float, pids: dict[str, int]) -> dict[str, Any]:
    """One wrk run; the parsed Lua summary plus the CPU share each of ``pids`` used meanwhile (100 = one core)."""
    threads = 1 if concurrency == 1 else 2
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    done = subprocess.run(  # noqa: S603
        [
            wrk_binary(),
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            f"--timeout={WRK_TIMEOUT_S}s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    cpu = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    lines = done.stdout.splitlines()
    result = next((line for line in lines if line.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or result is None:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    parsed: dict[str, Any] = json.loads(result.removeprefix("BENCH_RESULT "))
    sample = next((line for line in lines if line.startswith("BENCH_SAMPLE ")), "BENCH_SAMPLE ")
    parsed["bad_sample"] = sample.removeprefix("BENCH_SAMPLE ").strip()
    parsed["cpu_percent"] = {name: 100.0 * used / (parsed["duration_us"] / 1e6) for name, used in cpu.items()}
    return parsed


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    era: str
    captured: Captured
    script: Path
    process: str = "gateway"  # whose RSS is sampled


def measure(target: Target, concurrency: int, seconds: float, pids: dict[str, int]) -> Run:
    with rss_peak(pids[target.process]) as peak:
        raw = wrk(target.script, target.captured.url, concurrency, seconds, pids)
    return Run(
        target=target.name,
        era=target.era,
        concurrency=concurrency,
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        ok=raw["ok"],
        bad_status=raw["bad_status"],
        bad_body=raw["bad_body"],
        socket_errors=raw["socket_errors"],
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        gateway_cpu_percent=raw["cpu_percent"]["gateway"],
        upstream_cpu_percent=raw["cpu_percent"]["upstream"],
        rss_peak_mb=peak[0] / 1024,
        bad_sample=raw["bad_sample"],
    )


async def prepare_targets(
    upstream: str,
    gateway: str,
    token: str,
    eras: list[str],
    concurrencies: list[int],
    tmp: Path,
    unaudited: str | None = None,
) -> list[Target]:
    marker = "bench-" + secrets.token_hex(6)
    targets: list[Target] = []
    sessions_needed = max(concurrencies)
    for era in eras:
        mode = MODERN if era == "modern" else LEGACY
        tool = "echolegacy__echo" if era == "legacy" else "echo__echo"
        cases = [("direct", upstream, "echo", None), ("bastion", gateway, tool, token)]
        if unaudited is not None:
            cases.append(("unaudited", unaudited, tool, token))
        for name, url, tool, auth in cases:
            captured = await capture(url, tool, mode, marker, auth)
            sessions = await open_sessions(captured, sessions_needed) if captured.handshake else []
            script = tmp / f"{name}-{era}.lua"
            # One script per thread count would differ only in nthreads; 2 threads spreads sessions evenly for both.
            script.write_text(lua_script(captured, marker, sessions, 2), encoding="utf-8")
            targets.append(Target(name, era, captured, script, "unaudited" if name == "unaudited" else "gateway"))
    return targets


def _fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def table(runs: list[Run]) -> str:
    header = (
        f"{'era':<7} {'c':>3} | {'direct req/s':>12} {'bastion req/s':>13} {'ratio':>6} | "
        f"{'direct p50/p99 ms':>17} {'bastion p50/p99 ms':>18} {'added p50':>9} | "
        f"{'bastion cpu':>11} {'upstream cpu d/b':>16} {'gw RSS MB':>9} | errors"
    )
    lines = [header, "-" * len(header)]
    pairs: dict[tuple[str, int], dict[str, Run]] = {}
    for run in runs:
        pairs.setdefault((run.era, run.concurrency), {})[run.target] = run
    for (era, concurrency), pair in pairs.items():
        direct, through = pair["direct"], pair["bastion"]
        ratio = _ratio(direct, through)
        shown = "sat." if ratio is None else f"{ratio:.0%}"
        errors = sum(r.requests - r.ok for r in (direct, through))
        lines.append(
            f"{era:<7} {concurrency:>3} | {_fmt_rps(direct.rps):>12} {_fmt_rps(through.rps):>13} {shown:>6} | "
            f"{direct.p50_ms:>7.2f} / {direct.p99_ms:>7.2f} {through.p50_ms:>8.2f} / {through.p99_ms:>7.2f} "
            f"{through.p50_ms - direct.p50_ms:>9.2f} | {through.gateway_cpu_percent:>10.0f}% "
            f"{direct.upstream_cpu_percent:>7.0f}%/{through.upstream_cpu_percent:>6.0f}% "
            f"{through.rss_peak_mb or 0:>9.1f} | {errors}"
        )
        lines.extend(
            f"    {run.target}: {run.bad_status} non-200, {run.bad_body} wrong bodies, "
            f"{run.socket_errors} socket errors; e.g. {run.bad_sample[:200]}"
            for run in (direct, through)
            if run.requests != run.ok
        )
    return "\n".join(lines)


def _ratio(direct: Run, through: Run) -> float | None:
    """Through Bastion as a share of direct, or None when the upstream was saturated while Bastion was in front of it
    (the run then measured the upstream; direct runs are meant to take the upstream to its limit)."""
    if through.upstream_cpu_percent >= SATURATED_CPU_PERCENT:
        return None
    return through.rps / direct.rps if direct.rps else 0.0


def audit_table(runs: list[Run]) -> str:
    """Through Bastion with the audit log on (every call durably written first) next to the same gateway without it."""
    header = (
        f"{'era':<7} {'c':>3} | {'audit off req/s':>15} {'audit on req/s':>14} {'ratio':>6} | "
        f"{'off p50/p99 ms':>15} {'on p50/p99 ms':>15} {'added p50':>9}"
    )
    lines = [header, "-" * len(header)]
    pairs: dict[tuple[str, int], dict[str, Run]] = {}
    for run in runs:
        pairs.setdefault((run.era, run.concurrency), {})[run.target] = run
    for (era, concurrency), pair in pairs.items():
        if "unaudited" not in pair:
            continue
        off, on = pair["unaudited"], pair["bastion"]
        ratio = on.rps / off.rps if off.rps else 0.0
        lines.append(
            f"{era:<7} {concurrency:>3} | {_fmt_rps(off.rps):>15} {_fmt_rps(on.rps):>14} {ratio:>6.0%} | "
            f"{off.p50_ms:>6.2f} / {off.p99_ms:>6.2f} {on.p50_ms:>6.2f} / {on.p99_ms:>6.2f} "
            f"{on.p50_ms - off.p50_ms:>9.2f}"
        )
    return "\n".join(lines)


def verdicts(runs: list[Run], database: str, idle_mb: float) -> list[str]:
    out: list[str] = []
    ratio_target, added_target = TARGETS.get(database.split()[0], TARGETS["postgresql"])
    by = {(r.era, r.target, r.concurrency): r for r in runs}
    for era in sorted({r.era for r in runs}):
        d64, b64 = by.get((era, "direct", 64)), by.get((era, "bastion", 64))
        if d64 and b64:
            ratio = _ratio(d64, b64)
            if ratio is None:
                out.append(
                    f"{era}: no ratio at c=64: the upstream was saturated behind Bastion "
                    f"(>= {SATURATED_CPU_PERCENT:.0f} % CPU)"
                )
            else:
                ok = "ok" if ratio >= ratio_target else "MISSED"
                out.append(f"{era}: throughput at c=64 is {ratio:.1%} of direct (target >= {ratio_target:.0%}): {ok}")
        d1, b1 = by.get((era, "direct", 1)), by.get((era, "bastion", 1))
        if d1 and b1:
            added = b1.p50_ms - d1.p50_ms
            ok = "ok" if added <= added_target else "MISSED"
            out.append(f"{era}: added p50 at c=1 is {added:.2f} ms (target <= {added_target:g} ms): {ok}")
    ok = "ok" if idle_mb <= TARGET_IDLE_RSS_MB else "MISSED"
    out.append(f"gateway idle RSS is {idle_mb:.1f} MB (target <= {TARGET_IDLE_RSS_MB:.0f} MB): {ok}")
    return out


# --- --profile -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def profiling(pid: int, out: Path, seconds: float) -> Generator[None, None, None]:
    """py-spy samples ``pid`` while the block runs, writing collapsed stacks to ``out``."""
    py_spy = Path(sys.executable).with_name("py-spy")
    args = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
    args += ["--rate", str(PROFILE_RATE_HZ), "--duration", str(int(seconds) + 1), "--nonblocking"]
    recorder = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    try:
        yield
    finally:
        _, err = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0:
            raise SystemExit(f"py-spy failed ({recorder.returncode}): {err.decode(errors='replace')[-2000:]}")


def profile_summary(collapsed: Path, top: int = 25) -> str:
    """Own and inclusive time per function of py-spy's collapsed stacks, as shares of all samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "py-spy recorded no samples"
    lines = [f"{total:,} samples; own time (the function itself) and inclusive time (with what it calls):"]
    width = max(len(f) for f in [*own, *inclusive])
    width = min(width, 90)
    lines.append(f"  {'own':>6}  {'function':<{width}}")
    lines += [f"  {n / total:>6.1%}  {f[:width]:<{width}}" for f, n in sorted(own.items(), key=lambda x: -x[1])[:top]]
    lines.append(f"  {'incl.':>6}  {'function':<{width}}")
    lines += [
        f"  {n / total:>6.1%}  {f[:width]:<{width}}" for f, n in sorted(inclusive.items(), key=lambda x: -x[1])[:top]
    ]
    return "\n".join(lines)


def _frame(raw: str) -> str:
    """``function (path/to/module.py:line)`` shortened to ``function (package/module.py)``."""
    name, _, where = raw.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured case")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per target first")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated connection counts")
    parser.add_argument("--era", default="modern,legacy", help="modern, legacy or both")
    parser.add_argument("--database-url", help="BASTION_DATABASE_URL for Bastion (default: embedded SQLite)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, Lua scripts)")
    parser.add_argument(
        "--no-audit-comparison",
        action="store_true",
        help="skip the second gateway (audit log off) that shows what the audit log costs",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="measure with a policy rule, a rate limit and a content rule in the workspace (none refuses a call)",
    )
    parser.add_argument("--upstream", choices=sorted(UPSTREAMS), default="raw", help="the echo upstream to use")
    parser.add_argument("--profile", type=Path, help="py-spy the gateway (modern era, top concurrency) into FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()
    wrk_binary()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    eras = [e.strip() for e in args.era.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-gw-"))
    processes = Processes()
    load_before = _loadavg()
    try:
        gw_port = _free_port()
        upstream, upstream_url = start_upstream(processes, tmp, kind=args.upstream)
        env = bastion_env(tmp, args.database_url)
        token = provision(env, upstream_url, tmp)
        if args.rules:
            add_rules(env)
        gw_log = tmp / "bastion.log"
        bastion = processes.start([str(BASTION), "serve", "--host", "127.0.0.1", "--port", str(gw_port)], env, gw_log)
        _wait_ready(bastion, f"http://127.0.0.1:{gw_port}/readyz", gw_log)
        rss_idle_mb = _status_kb(bastion.pid, "VmRSS") / 1024
        gateway_url = f"http://127.0.0.1:{gw_port}/g/bench/mcp"
        pids = {"gateway": bastion.pid, "upstream": upstream.pid}
        unaudited_url = None
        if not args.no_audit_comparison:
            # The same data, a second process with the audit log off: the difference is what the log costs.
            na_port, na_log = _free_port(), tmp / "bastion-unaudited.log"
            unaudited = processes.start(
                [str(BASTION), "serve", "--host", "127.0.0.1", "--port", str(na_port)],
                {**env, "BASTION_AUDIT_MCP_CALLS": "false"},
                na_log,
            )
            _wait_ready(unaudited, f"http://127.0.0.1:{na_port}/readyz", na_log)
            unaudited_url = f"http://127.0.0.1:{na_port}/g/bench/mcp"
            pids["unaudited"] = unaudited.pid
        targets = anyio.run(prepare_targets, upstream_url, gateway_url, token, eras, concurrencies, tmp, unaudited_url)
        for target in targets:
            wrk(target.script, target.captured.url, 8, args.warmup, pids)
        runs: list[Run] = []
        profiled = (eras[0], max(concurrencies), "bastion") if args.profile else None
        for era in eras:
            for concurrency in concurrencies:
                for target in (t for t in targets if t.era == era):
                    if profiled == (era, concurrency, target.name):
                        with profiling(bastion.pid, args.profile, args.duration):
                            runs.append(measure(target, concurrency, args.duration, pids))
                    else:
                        runs.append(measure(target, concurrency, args.duration, pids))
        hwm_mb = _status_kb(bastion.pid, "VmHWM") / 1024
        rss_after_mb = _status_kb(bastion.pid, "VmRSS") / 1024
        load_after = _loadavg()
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    database = (args.database_url or "sqlite (embedded)").split(":", 1)[0].split("+", 1)[0]
    if args.json:
        doc = {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "database": database,
            "duration_s": args.duration,
            "gateway_rss_mb": {"idle": rss_idle_mb, "after": rss_after_mb, "peak_hwm": hwm_mb},
            "runs": [{**asdict(r), "rps": r.rps} for r in runs],
            "upstream": args.upstream,
            "rules": args.rules,
            "verdicts": verdicts(runs, database, rss_idle_mb),
        }
        print(json.dumps(doc, indent=2))  # noqa: T201
        return
    print(  # noqa: T201
        f"tools/call echo, {args.duration:g} s per case, {os.cpu_count()} CPUs, database {database}, "
        f"{args.upstream} upstream, "
        f"{'a policy rule, a rate limit and a content rule, ' if args.rules else 'no rules, '}"
        f"load average {load_before} before, {load_after} after"
    )
    print(table(runs))  # noqa: T201
    if not args.no_audit_comparison:
        print("\nthe audit log's cost: the same gateway with it off and on")  # noqa: T201
        print(audit_table(runs))  # noqa: T201
    print(  # noqa: T201
        f"gateway RSS: {rss_idle_mb:.1f} MB idle, {rss_after_mb:.1f} MB after the runs, {hwm_mb:.1f} MB peak (VmHWM)"
    )
    for line in verdicts(runs, database, rss_idle_mb):
        print(line)  # noqa: T201
    if args.profile:
        print(f"\nwhere the gateway's time went ({profiled[0]} era, c={profiled[1]}), stacks in {args.profile}:")  # noqa: T201
        print(profile_summary(args.profile))  # noqa: T201
    if args.keep:
        print(f"logs and scripts kept in {tmp}")  # noqa: T201


if __name__ == "__main__":
    main()
