"""Run the official MCP conformance suite's server scenarios against a URL and summarise the result.

``run_suite(url, requirements, label)`` installs what it needs (``scripts/conformance install``: Node >= 22
and the pinned suite under ``.tools/``), runs ``conformance server --requirements R`` and reads every
scenario's ``checks.json``. Artifacts go to ``artifacts/conformance/<label>-<requirements>/``: the raw
scenario directories, the suite's console output and ``summary.json``.

CLI: ``python -m tests.conformance.harness --url URL --label NAME [--requirements R]...`` or ``--fixture``
to score the fixture upstream; ``scripts/conformance`` wraps it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

REPO: Final = Path(__file__).resolve().parents[2]
SUITE_VERSION: Final = "0.2.0-alpha.12"
SUITE_DIR: Final = REPO / ".tools" / "conformance" / "node_modules" / "@modelcontextprotocol" / "conformance"
ARTIFACTS_ROOT: Final = REPO / "artifacts" / "conformance"
REQUIREMENT_SETS: Final = ("2025-11-25", "2026-07-28")
INSTALL_TIMEOUT_S: Final = 600.0
SUITE_TIMEOUT_S: Final = 300.0

_RESULT_DIR: Final = re.compile(r"server-(.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z")

Status = Literal["passed", "failed", "missing"]


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """One scenario's checks, counted the way the suite counts them (a scenario passes with no FAILURE)."""

    passed: int
    failed: int
    warnings: int
    status: Status
    required: bool
    failed_checks: tuple[str, ...] = ()

    @classmethod
    def from_checks(cls, checks: list[dict[str, Any]], *, required: bool) -> ScenarioResult:
        def count(status: str) -> int:
            return sum(1 for check in checks if check.get("status") == status)

        failed = tuple(str(check.get("id")) for check in checks if check.get("status") == "FAILURE")
        return cls(
            passed=count("SUCCESS"),
            failed=len(failed),
            warnings=count("WARNING"),
            status="failed" if failed else "passed",
            required=required,
            failed_checks=failed,
        )


@dataclass(frozen=True, slots=True)
class Summary:
    """A whole run: every server scenario of one requirement set against one URL."""

    label: str
    requirements: str
    url: str
    scenarios: dict[str, ScenarioResult]
    exit_code: int
    wall_time_s: float
    artifacts: Path = field(compare=False)

    @property
    def totals(self) -> dict[str, int]:
        results = self.scenarios.values()
        return {
            "checks_passed": sum(r.passed for r in results),
            "checks_failed": sum(r.failed for r in results),
            "warnings": sum(r.warnings for r in results),
            "scenarios": len(self.scenarios),
            "scenarios_failed": sum(r.status != "passed" for r in results),
            "required": sum(r.required for r in results),
            "required_failed": len(self.required_failures()),
        }

    def required_failures(self) -> set[str]:
        return {name for name, r in self.scenarios.items() if r.required and r.status != "passed"}

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "requirements": self.requirements,
            "url": self.url,
            "suite": f"@modelcontextprotocol/conformance@{SUITE_VERSION}",
            "exit_code": self.exit_code,
            "wall_time_s": round(self.wall_time_s, 3),
            "totals": self.totals,
            "scenarios": {name: asdict(result) for name, result in sorted(self.scenarios.items())},
        }


def compare(reference: Summary, candidate: Summary, *, required_only: bool = True, at_least: bool = False) -> list[str]:
    """Every scenario whose outcome differs between two runs of the same requirement set (empty when equal).

    Outcome means status plus passed/failed check counts; warnings are advisory and not compared. With
    ``at_least``, a scenario the candidate passes where the reference fails is no difference (a gateway may
    repair what a sloppy upstream sends).
    """
    if reference.requirements != candidate.requirements:
        return [f"requirement sets differ: {reference.requirements} vs {candidate.requirements}"]
    differences: list[str] = []
    for name in sorted(reference.scenarios.keys() | candidate.scenarios.keys()):
        ref, cand = reference.scenarios.get(name), candidate.scenarios.get(name)
        if required_only and not ((ref is not None and ref.required) or (cand is not None and cand.required)):
            continue
        ref_outcome = (ref.status, ref.passed, ref.failed) if ref else None
        cand_outcome = (cand.status, cand.passed, cand.failed) if cand else None
        if at_least and ref is not None and cand is not None and ref.status != "passed" and cand.status == "passed":
            continue
        if ref_outcome != cand_outcome:
            differences.append(
                f"{name}: {reference.label}={ref_outcome} {candidate.label}={cand_outcome}"
                + (f" (failed checks: {list(cand.failed_checks)})" if cand and cand.failed_checks else "")
            )
    return differences


def ensure_installed() -> Path:
    """Install Node >= 22 and the pinned suite if they are missing; the node executable to use."""
    done = subprocess.run(
        [str(REPO / "scripts" / "conformance"), "install"],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/conformance install failed ({done.returncode}):\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def server_scenarios(requirements: str) -> dict[str, bool]:
    """Every server scenario the requirement set runs, mapped to whether it is required (scored)."""
    text = (SUITE_DIR / "requirements" / f"{requirements}.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    scenarios: dict[str, bool] = dict.fromkeys(data.get("server") or [], True)
    not_scored: list[dict[str, str]] = data.get("not_scored") or []
    for entry in not_scored:
        if entry.get("leg") == "server":
            scenarios.setdefault(entry["scenario"], False)
    return scenarios


def read_results(raw: Path, expected: dict[str, bool]) -> dict[str, ScenarioResult]:
    """Parse ``raw/server-<scenario>-<timestamp>/checks.json``; an expected scenario without one is "missing"."""
    results: dict[str, ScenarioResult] = {}
    # Timestamps sort lexically, so the last directory of a scenario is its latest run.
    for checks_file in sorted(raw.glob("server-*/checks.json")):
        name = _scenario_of(checks_file.parent.name)
        checks = json.loads(checks_file.read_text(encoding="utf-8"))
        results[name] = ScenarioResult.from_checks(checks, required=expected.get(name, False))
    for name, required in expected.items():
        results.setdefault(name, ScenarioResult(0, 0, 0, "missing", required))
    return results


def _scenario_of(directory: str) -> str:
    """``server-tools-list-2026-01-02T03-04-05-678Z`` -> ``tools-list``."""
    match = _RESULT_DIR.fullmatch(directory)
    return match.group(1) if match else directory.removeprefix("server-")


def worker_suffix() -> str:
    """``-gw1`` in pytest-xdist worker gw1, else nothing: each worker's runs write artifacts of their own (a
    module-scoped run happens once per worker that needs it, and two sharing a directory delete each other's)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"-{worker}" if worker else ""


def run_suite(url: str, requirements: str, label: str, *, artifacts_root: Path = ARTIFACTS_ROOT) -> Summary:
    """Run every server scenario of ``requirements`` against ``url`` and write the artifacts for ``label``."""
    if requirements not in REQUIREMENT_SETS:
        raise ValueError(f"unknown requirement set {requirements!r}; expected one of {REQUIREMENT_SETS}")
    node = ensure_installed()
    out = artifacts_root / f"{label}-{requirements}{worker_suffix()}"
    shutil.rmtree(out, ignore_errors=True)
    raw = out / "raw"
    raw.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    command = [str(node), str(SUITE_DIR / "dist" / "index.js"), "server", "--url", url]
    command += ["--requirements", requirements, "-o", str(raw)]
    started = time.monotonic()
    with (out / "console.txt").open("wb") as console:
        done = subprocess.run(
            command, stdout=console, stderr=subprocess.STDOUT, env=env, timeout=SUITE_TIMEOUT_S, check=False
        )
    wall_time = time.monotonic() - started
    summary = Summary(
        label=label,
        requirements=requirements,
        url=url,
        scenarios=read_results(raw, server_scenarios(requirements)),
        exit_code=done.returncode,
        wall_time_s=wall_time,
        artifacts=out,
    )
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: Summary) -> str:
    lines = [f"{summary.label} {summary.requirements} ({summary.url}) in {summary.wall_time_s:.1f} s:"]
    for name, result in sorted(summary.scenarios.items()):
        mark = {"passed": "ok  ", "failed": "FAIL", "missing": "MISS"}[result.status]
        scope = "" if result.required else "  (not scored)"
        lines.append(f"  {mark} {name}: {result.passed} passed, {result.failed} failed{scope}")
    totals = summary.totals
    lines.append(
        f"  required: {totals['required'] - totals['required_failed']}/{totals['required']} passed; "
        f"checks: {totals['checks_passed']} passed, {totals['checks_failed']} failed -> {summary.artifacts}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score an MCP server with the official conformance suite.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="the MCP endpoint to score")
    target.add_argument("--fixture", action="store_true", help="start the fixture upstream and score it")
    parser.add_argument("--label", help="names the artifacts directory (default: fixture, or target)")
    parser.add_argument("--requirements", action="append", choices=REQUIREMENT_SETS, help="default: all")
    args = parser.parse_args(argv)
    requirement_sets: list[str] = args.requirements or list(REQUIREMENT_SETS)
    if args.fixture:
        from tests.conformance.upstream import serving_fixture

        with serving_fixture() as url:
            summaries = [run_suite(url, r, args.label or "fixture") for r in requirement_sets]
    else:
        summaries = [run_suite(args.url, r, args.label or "target") for r in requirement_sets]
    sys.stdout.write("\n\n".join(format_summary(s) for s in summaries) + "\n")
    return 1 if any(s.required_failures() for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
