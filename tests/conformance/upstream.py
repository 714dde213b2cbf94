"""The fixture upstream as a real process: a free 127.0.0.1 port, ready on entry, always killed on exit."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from tests.processes import START_TIMEOUT_S, free_port, uncovered_env

REPO: Final = Path(__file__).resolve().parents[2]
POLL_S: Final = 0.05


@contextmanager
def serving_fixture(*, sloppy: bool = False, timeout: float = START_TIMEOUT_S) -> Generator[str]:
    """``python -m tests.fixtures.conformance_server`` on a free port (``--sloppy`` with ``sloppy``); yields its MCP
    URL once it is listening."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="conformance-fixture-") as tmp:
        stdout_path, stderr_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fixtures.conformance_server",
                    "--port",
                    str(port),
                    *(["--sloppy"] if sloppy else []),
                ],
                cwd=REPO,
                env=uncovered_env(),
                stdout=stdout,
                stderr=stderr,
            )
            try:
                try:
                    url = _wait_for_url(process, stdout_path, timeout)
                except AssertionError as exc:
                    stderr_text = stderr_path.read_text(encoding="utf-8", errors="replace")
                    raise AssertionError(f"{exc}\n--- stderr ---\n{stderr_text}") from None
                yield url
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=10)


def _wait_for_url(process: subprocess.Popen[bytes], stdout_path: Path, timeout: float) -> str:
    """The ``{"url": ...}`` line the server prints once it listens; fail at once if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stdout_path.read_text(encoding="utf-8").partition("\n")
        if line[1]:
            url: str = json.loads(line[0])["url"]
            return url
        # Waiting on the process paces the loop and notices a crash straight away.
        try:
            code = process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the conformance fixture exited with {code} before it was listening")
    raise AssertionError(f"the conformance fixture was not listening within {timeout} s")
