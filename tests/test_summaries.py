from __future__ import annotations

import logging

import pytest

from bastion.summaries import Tally


def test_a_tally_logs_its_first_event_at_once_then_what_gathered_once_a_period_has_passed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bastion.test")
    now = [100.0]
    tally = Tally(logging.getLogger("bastion.test"), "refused", every_s=60, clock=lambda: now[0])
    failure = ConnectionRefusedError("database down")
    for at, kind in ((100, "slow"), (110, "slow"), (120, "large"), (161, "slow"), (170, "large")):
        now[0] = at
        tally.note(kind, error=failure if at == 161 else None)
    records = [r for r in caplog.records if r.name == "bastion.test"]
    assert [r.getMessage() for r in records] == ["refused: 1 slow", "refused: 2 slow, 1 large"]
    assert [r.__dict__["counts"] for r in records] == [{"slow": 1}, {"slow": 2, "large": 1}]
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    assert records[0].exc_info is None
    assert records[1].exc_info is not None and records[1].exc_info[1] is failure
