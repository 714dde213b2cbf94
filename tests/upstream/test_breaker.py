"""Circuit breaking per upstream server (upstream/breaker.py), on a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from bastion.upstream.breaker import PROBE_BUSY_RETRY_S, Breakers


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breakers(clock: _Clock) -> Breakers:
    return Breakers(failures_to_open=3, open_s=5, max_open_s=12, clock=clock)


def test_failures_in_a_row_open_the_circuit_and_an_answer_between_them_starts_the_count_again() -> None:
    clock = _Clock()
    breakers = _breakers(clock)
    for _ in range(2):
        breakers.failed("crm")
    breakers.succeeded("crm")
    for _ in range(2):
        breakers.failed("crm")
    assert breakers.refusal("crm", probe=True) is None
    breakers.abandoned("crm")  # the call above went nowhere
    breakers.failed("crm")
    assert breakers.refusal("crm", probe=True) == 5
    assert breakers.refusal("crm", probe=False) == 5
    clock.now += 3.2
    assert breakers.refusal("crm", probe=True) == 2  # whole seconds, rounded up
    assert breakers.refusal("billing", probe=True) is None  # each server has its own circuit


def test_once_open_one_probe_goes_its_failure_doubles_the_wait_up_to_the_bound_and_its_success_closes() -> None:
    clock = _Clock()
    breakers = _breakers(clock)
    for _ in range(3):
        breakers.failed("crm")
    clock.now += 5
    assert breakers.refusal("crm", probe=False) is None  # a session may be opened: that is no probe
    assert breakers.refusal("crm", probe=True) is None  # the probe
    assert breakers.refusal("crm", probe=True) == PROBE_BUSY_RETRY_S  # while it is out
    breakers.failed("crm")
    assert breakers.refusal("crm", probe=True) == 10
    clock.now += 10
    assert breakers.refusal("crm", probe=True) is None
    breakers.failed("crm")
    assert breakers.refusal("crm", probe=True) == 12  # at most max_open_s
    clock.now += 12
    assert breakers.refusal("crm", probe=True) is None
    breakers.abandoned("crm")  # the probe was called off: the next call probes instead
    assert breakers.refusal("crm", probe=True) is None
    breakers.succeeded("crm")
    assert breakers.refusal("crm", probe=True) is None
    assert breakers.refusal("crm", probe=True) is None  # closed: no probe, every call goes
    for _ in range(3):
        breakers.failed("crm")
    assert breakers.refusal("crm", probe=True) == 5  # a fresh episode starts from the first wait


def test_forgetting_a_server_closes_its_circuit_and_forgetting_all_closes_every_one() -> None:
    clock = _Clock()
    breakers = _breakers(clock)
    for server in ("crm", "billing", "docs"):
        for _ in range(3):
            breakers.failed(server)
    breakers.forget("crm")
    assert breakers.refusal("crm", probe=True) is None
    assert breakers.refusal("billing", probe=True) == 5
    breakers.forget()
    assert [breakers.refusal(s, probe=True) for s in ("billing", "docs")] == [None, None]


def test_an_episode_logs_when_the_circuit_opens_and_when_it_closes_not_per_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bastion.upstream")
    clock = _Clock()
    breakers = _breakers(clock)
    for _ in range(8):
        breakers.failed("crm")
        breakers.refusal("crm", probe=True)
    clock.now += 5
    assert breakers.refusal("crm", probe=True) is None
    breakers.succeeded("crm")
    breakers.succeeded("crm")
    lines = [r.getMessage() for r in caplog.records if r.name == "bastion.upstream"]
    assert lines == ["upstream keeps failing; its circuit is open", "upstream answers again; its circuit is closed"]
