"""The real OAuth peers of the browser journey as processes: the authorization server (npm's oidc-provider,
tests/fixtures/oidc_as) and the protected MCP upstream (tests/fixtures/protected_upstream.py).

Each starts on a 127.0.0.1 port, is ready on entry (its first stdout line is a JSON object), reports what
it saw as later JSON lines (``events()``) and is always killed on exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from tests.processes import START_TIMEOUT_S, free_port, uncovered_env

REPO: Final = Path(__file__).resolve().parents[2]
OIDC_AS_DIR: Final = REPO / "tests" / "fixtures" / "oidc_as"
OIDC_AS_MODULES: Final = REPO / ".tools" / "oidc_as" / "node_modules"
POLL_S: Final = 0.05
# The test users of tests/fixtures/oidc_as/server.mjs: username -> password.
AS_USERS: Final = {"ada": "ada-password", "grace": "grace-password"}


@dataclass(frozen=True)
class Peer:
    """A running peer: its ready line and the JSON lines it printed since."""

    ready: dict[str, Any]
    stdout_path: Path
    stderr_path: Path

    def events(self) -> list[dict[str, Any]]:
        lines = self.stdout_path.read_text(encoding="utf-8").splitlines()[1:]
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


@cache
def node_for_oidc_as() -> Path:
    """Install Node >= 22 and the pinned oidc-provider if they are missing (scripts/oidc-as install); the node."""
    done = subprocess.run(
        [str(REPO / "scripts" / "oidc-as"), "install"], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/oidc-as install failed ({done.returncode}):\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


@contextmanager
def _running(name: str, command: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> Generator[Peer]:
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        stdout_path, stderr_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=stdout, stderr=stderr)
            try:
                try:
                    ready = _wait_for_ready_line(name, process, stdout_path)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n--- stderr ---\n{stderr_path.read_text(encoding='utf-8')}") from None
                yield Peer(ready, stdout_path, stderr_path)
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=10)


def _wait_for_ready_line(name: str, process: subprocess.Popen[bytes], stdout_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = stdout_path.read_text(encoding="utf-8").partition("\n")
        if line[1]:
            ready: dict[str, Any] = json.loads(line[0])
            return ready
        # Waiting on the process paces the loop and notices a crash straight away.
        try:
            code = process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"{name} exited with {code} before it was ready")
    raise AssertionError(f"{name} was not ready within {START_TIMEOUT_S} s")


@contextmanager
def authorization_server(
    resources: Sequence[str],
    *,
    port: int | None = None,
    access_token_ttl_s: int = 600,
    clients: Sequence[Mapping[str, Any]] = (),
) -> Generator[Peer]:
    """oidc-provider on ``port`` or a free one for ``resources`` (and pre-registered ``clients``); its issuer is
    ``ready["issuer"]``."""
    node = node_for_oidc_as()
    with tempfile.TemporaryDirectory(prefix="oidc-as-") as tmp:
        # Node resolves `oidc-provider` next to the script: run a copy beside the installed node_modules.
        workdir = Path(tmp)
        (workdir / "node_modules").symlink_to(OIDC_AS_MODULES, target_is_directory=True)
        (workdir / "server.mjs").write_bytes((OIDC_AS_DIR / "server.mjs").read_bytes())
        (workdir / "package.json").write_bytes((OIDC_AS_DIR / "package.json").read_bytes())
        command = [
            str(node),
            "server.mjs",
            "--port",
            str(port or free_port()),
            "--access-token-ttl",
            str(access_token_ttl_s),
        ]
        for resource in resources:
            command += ["--resource", resource]
        for client in clients:
            command += ["--client", json.dumps(client)]
        env = {**os.environ, "NODE_ENV": "test"}
        with _running("oidc-as", command, workdir, env) as peer:
            yield peer


def upstream_resource() -> tuple[int, str]:
    """A free port for the protected upstream and its resource URL (needed before the AS starts)."""
    port = free_port()
    return port, f"http://127.0.0.1:{port}/mcp"


@contextmanager
def protected_upstream(port: int, issuer: str) -> Generator[Peer]:
    """``python -m tests.fixtures.protected_upstream`` on ``port`` trusting ``issuer``; ``ready["url"]``: MCP URL."""
    command = [sys.executable, "-m", "tests.fixtures.protected_upstream", "--port", str(port), "--issuer", issuer]
    with _running("protected-upstream", command, REPO, uncovered_env()) as peer:
        yield peer
