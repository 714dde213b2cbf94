"""Time from spawning `bastion serve` to its first healthy /healthz, median of 5 runs (target: under 2 s).

Run with `uv run python bench/startup.py`. Two numbers: a first start (empty data directory: secrets
generated, SQLite created and migrated) and a restart (everything already in place).

Like a deployed install (pip, or uv with UV_COMPILE_BYTECODE=1), the servers run with Python bytecode
cached (in a private temporary prefix, warmed by one unmeasured start). `--no-bytecode-cache` measures
an environment that compiles every module from source on every start (PYTHONDONTWRITEBYTECODE and no
.pyc files, as `uv sync` leaves a venv by default): expect several times slower.
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


def _time_to_healthy(data_dir: Path, base_env: dict[str, str]) -> float:
    port = _free_port()
    env = {**base_env, "BASTION_DATA_DIR": str(data_dir)}
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
    cache = "--no-bytecode-cache" not in sys.argv[1:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        if cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
            _time_to_healthy(Path(tmp) / "warm-up", env)
        first = [_time_to_healthy(Path(tmp) / f"fresh-{i}", env) for i in range(RUNS)]
        restart = [_time_to_healthy(Path(tmp) / "fresh-0", env) for _ in range(RUNS)]
    mode = "bytecode cached" if cache else "no bytecode cache"
    for label, times in (("first start", first), ("restart", restart)):
        median = statistics.median(times)
        verdict = "ok" if median < TARGET_S else f"over the {TARGET_S} s target"
        runs = ", ".join(f"{t:.3f}" for t in times)
        print(f"startup {label} ({mode}): median {median:.3f} s over {RUNS} runs ({runs}) - {verdict}")  # noqa: T201


if __name__ == "__main__":
    main()
