"""Running the real `bastion` executable in tests: a clean environment, a free port, a server that is always killed."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import httpx2

BASTION: Path = Path(sys.executable).with_name("bastion")
# The suite's default bound on a test is 120 s (pyproject); the heaviest (property tests with hundreds of
# concurrent calls, the access matrix, process races) take 20-45 s quiet and may take four times that on a
# machine loaded by a second suite. Bounds only: nothing is timed.
HEAVY_TIMEOUT_S: Final = 360
START_TIMEOUT_S = 90.0  # an upper bound only: a machine under load may take long to start a server
POLL_S = 0.05


# Test upstreams listen on http://127.0.0.1: a test Bastion opts in to reaching them (never the default).
TEST_OUTBOUND_ENV: Final = {"BASTION_OUTBOUND_ALLOW_LOOPBACK": "true"}


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any BASTION_ variable, plus the loopback opt-in and ``settings``.

    A `serve` started with it keeps no warm CLI helper (each would import the whole CLI once more, for nothing)
    unless a test asks for one with BASTION_WARM_CLI=true.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.update(TEST_OUTBOUND_ENV)
    env["BASTION_WARM_CLI"] = "false"
    env["BASTION_AUDIT_OPEN_TIMEOUT_S"] = "60"  # a loaded test machine may take longer than the default 10 s
    env.update(settings)
    return env


def uncovered_env() -> dict[str, str]:
    """This process's environment without coverage's subprocess hook, for a test peer written in Python: coverage
    measures only Bastion, and tracing a peer's every call only slows it (its start most, on a loaded machine)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}


def run_bastion(
    *args: str, env: Mapping[str, str], cwd: Path, timeout: float = START_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`bastion ARGS` to its end; ``timeout`` is an upper bound only, as for a server's start."""
    return subprocess.run(
        [str(BASTION), *args], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


_PORT_BLOCK: Final = 1000
_PORT_BASE: Final = 20000  # below Linux's ephemeral range (32768-60999), where outgoing connections take ports
_next_port = itertools.count()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on.

    In an xdist worker, from that worker's own block of ports, in turn: asking the kernel for port 0 and closing
    the socket races between workers, which may be handed the same port before either binds it. Elsewhere (a
    process a test started) the kernel's choice.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
    if "xdist" not in sys.modules or not worker.isdigit():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            chosen: int = sock.getsockname()[1]
            return chosen
    base = _PORT_BASE + int(worker) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + next(_next_port) % _PORT_BLOCK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + _PORT_BLOCK - 1}")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float) -> int:
        """SIGTERM, then the exit code once the process has drained (raises if it outlives ``timeout``)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def wait_until_healthy(process: subprocess.Popen[bytes], base_url: str, *, timeout: float = START_TIMEOUT_S) -> None:
    """Poll /healthz until it answers 200; fail at once if the process dies first."""
    deadline = time.monotonic() + timeout
    with httpx2.Client(base_url=base_url, timeout=1.0) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            # Waiting on the process paces the loop and notices a crash straight away.
            try:
                code = process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"bastion serve exited with {code} before it was healthy")
    raise AssertionError(f"bastion serve was not healthy within {timeout} s")


@contextmanager
def serving(env: Mapping[str, str], cwd: Path, *, port: int | None = None) -> Iterator[Server]:
    """`bastion serve` on ``port`` or a free 127.0.0.1 port, healthy on entry, killed on exit whatever happened."""
    port = port or free_port()
    stderr_path = cwd / f"serve-{port}.stderr"
    with stderr_path.open("wb") as stderr:
        process = _spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], env, cwd, stderr)
        try:
            server = Server(process, f"http://127.0.0.1:{port}", stderr_path)
            try:
                wait_until_healthy(process, server.base_url)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- stderr ---\n{server.stderr()}") from None
            yield server
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def _spawn(args: list[str], env: Mapping[str, str], cwd: Path, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BASTION), *args], env=dict(env), cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)


def instance_record(state: Path, *, naming: str, process: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    """The running-instance record a `serve` keeps under ``state`` ($XDG_STATE_HOME), once it names ``naming``
    (``base_url`` when it listens, ``cli_socket`` when its warm CLI helper is ready); fails at once if
    ``process`` dies first."""
    records = state / "bastion" / "instances"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for path in records.glob("*.json"):
            record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            if record.get(naming):
                return record
        if process is not None and process.poll() is not None:
            raise AssertionError(f"bastion serve exited with {process.returncode} before its record named {naming}")
        time.sleep(POLL_S)
    raise AssertionError(f"no running-instance record named {naming} within {START_TIMEOUT_S} s")
