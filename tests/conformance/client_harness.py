"""Run the official conformance suite's client auth scenarios against Bastion and summarise them.

The client under test is ``scripts/conformance-client`` (``tests.conformance.auth_client``): Bastion enrolling a
member at each scenario's mock server and calling a tool through its gateway. Sets:

- ``2025-11-25`` and ``2026-07-28``: ``conformance client --requirements R``; of what that runs, the ``auth/*``
  scenarios are this client's (the others test MCP client features the enrollment client does not play, and it
  declines them at once).
- ``backcompat``: the 2025-03-26 scenarios (metadata at the server's origin, default endpoints), one by one.

Artifacts: ``artifacts/conformance/client-<set>/`` (raw scenario directories, console output, ``summary.json``).
CLI: ``python -m tests.conformance.client_harness [--set S]...``; ``scripts/conformance client`` wraps it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import yaml

from tests.conformance.harness import (
    ARTIFACTS_ROOT,
    REPO,
    SUITE_DIR,
    ScenarioResult,
    Summary,
    ensure_installed,
    format_summary,
    worker_suffix,
)

CLIENT_COMMAND: Final = REPO / "scripts" / "conformance-client"
CLIENT_SETS: Final = ("2025-11-25", "2026-07-28", "backcompat")
BACKCOMPAT: Final = ("auth/2025-03-26-oauth-metadata-backcompat", "auth/2025-03-26-oauth-endpoint-fallback")
# Upper bounds only. The suite starts every scenario's client at once (~20-30), each with Bastion in process: on a
# slow 2-core machine, beside the suite's other heavy tests, the last ones have taken over 100 s of wall time.
SCENARIO_TIMEOUT_MS: Final = 300_000
RUN_TIMEOUT_S: Final = 900.0
_RESULT_DIR: Final = re.compile(r"(.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z")


def auth_scenarios(client_set: str) -> dict[str, bool]:
    """The auth scenarios a set runs, mapped to whether they are required (scored)."""
    if client_set == "backcompat":
        return dict.fromkeys(BACKCOMPAT, True)
    text = (SUITE_DIR / "requirements" / f"{client_set}.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    client: list[str] = data.get("client") or []
    not_scored: list[dict[str, str]] = data.get("not_scored") or []
    scenarios = {name: True for name in client if name.startswith("auth/")}
    for entry in not_scored:
        if entry.get("leg") == "client" and entry["scenario"].startswith("auth/"):
            scenarios.setdefault(entry["scenario"], False)
    return scenarios


def read_client_results(raw: Path, expected: dict[str, bool]) -> dict[str, ScenarioResult]:
    """Parse ``raw/<scenario>-<timestamp>/checks.json`` for the expected scenarios; absent ones are "missing"."""
    results: dict[str, ScenarioResult] = {}
    for checks_file in sorted(raw.glob("**/checks.json")):
        relative = checks_file.parent.relative_to(raw).as_posix()
        match = _RESULT_DIR.fullmatch(relative)
        name = match.group(1) if match else relative
        if name in expected:
            checks = json.loads(checks_file.read_text(encoding="utf-8"))
            results[name] = ScenarioResult.from_checks(checks, required=expected[name])
    for name, required in expected.items():
        results.setdefault(name, ScenarioResult(0, 0, 0, "missing", required))
    return results


def _commands(node: Path, client_set: str, raw: Path) -> list[list[str]]:
    base = [str(node), str(SUITE_DIR / "dist" / "index.js"), "client", "--command", str(CLIENT_COMMAND)]
    base += ["--timeout", str(SCENARIO_TIMEOUT_MS), "-o", str(raw)]
    if client_set == "backcompat":
        return [[*base, "--scenario", name] for name in BACKCOMPAT]
    return [[*base, "--requirements", client_set]]


@contextlib.contextmanager
def warm_client(out: Path) -> Iterator[Path | None]:
    """A helper with the auth client imported that forks one client per scenario (bastion.cli.warm): the suite
    starts ~20 clients per set, and each would otherwise import Bastion and the SDK afresh, all at once."""
    path = Path(tempfile.mkdtemp(prefix="bastion-conformance-")) / "client.sock"
    helper = subprocess.Popen(
        [sys.executable, "-m", "bastion.cli.warm", str(path), str(os.getpid()), "tests.conformance.auth_client:main"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = helper.stdout.readline() if helper.stdout is not None else b""
        yield path if ready else None
    finally:
        helper.terminate()
        helper.wait(timeout=10)
        if helper.stdout is not None:
            helper.stdout.close()
        shutil.rmtree(path.parent, ignore_errors=True)


def run_client_suite(client_set: str, *, artifacts_root: Path = ARTIFACTS_ROOT) -> Summary:
    """Run one set's scenarios with Bastion as the client; the auth scenarios' summary."""
    if client_set not in CLIENT_SETS:
        raise ValueError(f"unknown client set {client_set!r}; expected one of {CLIENT_SETS}")
    node = ensure_installed()
    out = artifacts_root / f"client-{client_set}{worker_suffix()}"
    shutil.rmtree(out, ignore_errors=True)
    raw = out / "raw"
    raw.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    started = time.monotonic()
    exit_code = 0
    with (out / "console.txt").open("wb") as console, warm_client(out) as socket_path:
        if socket_path is not None:
            env["CONFORMANCE_WARM_SOCKET"] = str(socket_path)
        for command in _commands(node, client_set, raw):
            done = subprocess.run(
                command, stdout=console, stderr=subprocess.STDOUT, env=env, timeout=RUN_TIMEOUT_S, check=False
            )
            exit_code = exit_code or done.returncode
    summary = Summary(
        label="client",
        requirements=client_set,
        url=str(CLIENT_COMMAND.relative_to(REPO)),
        scenarios=read_client_results(raw, auth_scenarios(client_set)),
        exit_code=exit_code,
        wall_time_s=time.monotonic() - started,
        artifacts=out,
    )
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score Bastion as an MCP OAuth client with the conformance suite.")
    parser.add_argument("--set", dest="sets", action="append", choices=CLIENT_SETS, help="default: all")
    args = parser.parse_args(argv)
    summaries = [run_client_suite(s) for s in (args.sets or list(CLIENT_SETS))]
    sys.stdout.write("\n\n".join(format_summary(s) for s in summaries) + "\n")
    return 1 if any(s.required_failures() for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
