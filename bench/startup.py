"""Time from spawning `bastion serve` to its first healthy /healthz, median of 5 runs (target: under 2 s).

Run with `uv run python bench/startup.py`. Two numbers: a first start (empty data directory: secrets
generated, SQLite created and migrated) and a restart (everything already in place).
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import httpx2

RUNS: Final = 5
TARGET_S: Final = 2.0
TIMEOUT_S: Final = 60.0
BASTION: Final = Path(sys.executable).with_name("bastion")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _time_to_healthy(data_dir: Path) -> float:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_DATA_DIR"] = str(data_dir)
    started = time.perf_counter()
    process = subprocess.Popen(  # noqa: S603
        [str(BASTION), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=1.0) as client:
            while time.perf_counter() - started < TIMEOUT_S:
                try:
                    if client.get("/healthz").status_code == 200:
                        return time.perf_counter() - started
                except httpx2.TransportError:
                    pass
                try:
                    code = process.wait(timeout=0.01)
                except subprocess.TimeoutExpired:
                    continue
                raise SystemExit(f"bastion serve exited with {code} before it was healthy")
        raise SystemExit(f"bastion serve was not healthy within {TIMEOUT_S} s")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        first = [_time_to_healthy(Path(tmp) / f"fresh-{i}") for i in range(RUNS)]
        restart = [_time_to_healthy(Path(tmp) / "fresh-0") for _ in range(RUNS)]
    for label, times in (("first start", first), ("restart", restart)):
        median = statistics.median(times)
        verdict = "ok" if median < TARGET_S else f"over the {TARGET_S} s target"
        runs = ", ".join(f"{t:.3f}" for t in times)
        print(f"startup {label}: median {median:.3f} s over {RUNS} runs ({runs}) - {verdict}")  # noqa: T201


if __name__ == "__main__":
    main()
