"""Attacks at the door, before any authentication: huge request heads and half-sent heads held open.

Run with `uv run python bench/edge.py` (or `scripts/bench edge`). It starts `bastion serve` on a fresh
embedded database and prints, as a table (or `--json`):

- the gateway's RSS idle, and its peak (VmHWM) after `--floods` concurrent requests that each send a
  `--header-mib` MiB header, with what each of those requests got back;
- `--heads` connections that send half a request head and then nothing: how many the gateway still holds
  open after `--hold` seconds, and /healthz answered (and its median latency) while they are held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx2

BASTION: Final = Path(sys.executable).with_name("bastion")
START_TIMEOUT_S: Final = 60.0
CHUNK: Final = 1024 * 1024
HALF_HEAD: Final = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _serving(data_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_DATA_DIR": str(data_dir), "BASTION_WARM_CLI": "false"}
    process = subprocess.Popen(  # noqa: S603 - our own executable
        [str(BASTION), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("bastion serve did not become healthy")
            time.sleep(0.05)
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _memory_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def _flood(port: int, header_mib: int) -> str:
    """One request whose single header is ``header_mib`` MiB; what came back (a status line, or how it ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            for _ in range(header_mib):
                sock.sendall(b"a" * CHUNK)
            sock.sendall(b"\r\n\r\n")
        except OSError as exc:
            return f"closed while sending ({exc.__class__.__name__})"
        try:
            answer = sock.recv(256)
        except OSError as exc:
            return f"closed ({exc.__class__.__name__})"
        return answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed"


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)  # an answer or the end of the connection: either way the gateway let go of it
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _healthz_ms(port: int, rounds: int) -> tuple[int, float]:
    answered = 0
    times: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        with contextlib.suppress(httpx2.TransportError):
            if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                answered += 1
                times.append((time.perf_counter() - started) * 1000)
    return answered, statistics.median(times) if times else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, _serving(Path(tmp)) as (process, port):
        idle = _memory_mib(process.pid, "VmRSS")
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(_flood(port, args.header_mib))) for _ in range(args.floods)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = _memory_mib(process.pid, "VmHWM")
        after = _memory_mib(process.pid, "VmRSS")

        heads: list[socket.socket] = []
        for _ in range(args.heads):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(HALF_HEAD)
                heads.append(sock)
            except OSError:
                break
        answered, healthz_ms = _healthz_ms(port, args.healthz)
        time.sleep(args.hold)
        held = sum(_still_open(sock) for sock in heads)
        for sock in heads:
            sock.close()
        return {
            "rss_idle_mib": round(idle, 1),
            "floods": args.floods,
            "header_mib": args.header_mib,
            "flood_answers": sorted(set(results)),
            "rss_peak_mib": round(peak, 1),
            "rss_after_mib": round(after, 1),
            "half_heads_opened": len(heads),
            "half_heads_held_after_s": args.hold,
            "half_heads_still_open": held,
            "healthz_answered": f"{answered}/{args.healthz}",
            "healthz_p50_ms": round(healthz_ms, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floods", type=int, default=8, help="concurrent requests with a huge header")
    parser.add_argument("--header-mib", type=int, default=32, help="size of each huge header, MiB")
    parser.add_argument("--heads", type=int, default=1100, help="connections that send half a head")
    parser.add_argument("--hold", type=float, default=22.0, help="seconds to hold them before counting")
    parser.add_argument("--healthz", type=int, default=20, help="/healthz requests while the heads are held")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))  # noqa: T201
        return
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")  # noqa: T201


if __name__ == "__main__":
    main()
