"""Reading the suite's per-scenario checks and comparing two runs, without running the suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conformance.harness import ScenarioResult, Summary, compare, read_results


def _write_checks(raw: Path, directory: str, *statuses: str) -> None:
    (raw / directory).mkdir(parents=True)
    checks: list[dict[str, Any]] = [{"id": f"check-{i}", "status": s} for i, s in enumerate(statuses)]
    (raw / directory / "checks.json").write_text(json.dumps(checks), encoding="utf-8")


def _summary(label: str, **scenarios: ScenarioResult) -> Summary:
    return Summary(label, "2026-07-28", "http://127.0.0.1:1/mcp", dict(scenarios), 0, 1.0, Path())


def test_results_count_checks_like_the_suite_and_flag_scenarios_that_never_ran(tmp_path: Path) -> None:
    _write_checks(tmp_path, "server-sep-2164-resource-not-found-2026-01-02T03-04-05-678Z", "SUCCESS", "WARNING")
    _write_checks(tmp_path, "server-tools-list-2026-01-02T03-04-05-001Z", "FAILURE")
    _write_checks(tmp_path, "server-tools-list-2026-01-02T03-04-06-001Z", "SUCCESS", "FAILURE", "INFO", "SKIPPED")
    expected = {"sep-2164-resource-not-found": True, "tools-list": True, "ping": False}

    results = read_results(tmp_path, expected)

    assert results["sep-2164-resource-not-found"] == ScenarioResult(1, 0, 1, "passed", required=True)
    # The later run of a scenario wins.
    assert results["tools-list"] == ScenarioResult(1, 1, 0, "failed", required=True, failed_checks=("check-1",))
    assert results["ping"] == ScenarioResult(0, 0, 0, "missing", required=False)


def test_compare_reports_required_scenarios_whose_outcome_differs() -> None:
    ok = ScenarioResult(2, 0, 0, "passed", required=True)
    reference = _summary("fixture", ping=ok, caching=ok, extra=ScenarioResult(1, 0, 0, "passed", required=False))
    candidate = _summary(
        "bastion",
        ping=ScenarioResult(2, 0, 3, "passed", required=True),  # warnings alone are not a difference
        caching=ScenarioResult(1, 1, 0, "failed", required=True, failed_checks=("ttl",)),
        extra=ScenarioResult(0, 1, 0, "failed", required=False),
    )

    assert compare(reference, reference) == []
    assert compare(reference, candidate) == [
        "caching: fixture=('passed', 2, 0) bastion=('failed', 1, 1) (failed checks: ['ttl'])"
    ]
    assert len(compare(reference, candidate, required_only=False)) == 2
    # Passing where the reference fails is a difference, except when the candidate need only do at least as well.
    assert compare(candidate, reference) == ["caching: bastion=('failed', 1, 1) fixture=('passed', 2, 0)"]
    assert compare(candidate, reference, at_least=True) == []
    assert compare(reference, candidate, at_least=True) == compare(reference, candidate)
