"""Retry budgets per upstream server (upstream/budget.py), on a clock the test moves."""

from __future__ import annotations

from bastion.upstream.budget import RetryBudgets


class _Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_retries_is_allowed_then_only_what_calls_and_time_earn() -> None:
    clock = _Clock()
    budgets = RetryBudgets(ratio=0.25, min_per_s=0.5, burst=3, clock=clock)
    assert [budgets.may_retry("crm") for _ in range(4)] == [True, True, True, False]
    for _ in range(3):
        budgets.called("crm")
    assert budgets.may_retry("crm") is False  # 0.75 of a retry earned
    budgets.called("crm")
    assert budgets.may_retry("crm") is True  # four calls earned one
    assert budgets.may_retry("crm") is False
    clock.now += 2  # the trickle: 0.5 a second
    assert budgets.may_retry("crm") is True
    assert budgets.may_retry("crm") is False
    clock.now += 60  # saved up to the burst, no more
    assert [budgets.may_retry("crm") for _ in range(4)] == [True, True, True, False]
    assert budgets.may_retry("billing") is True  # each server has its own budget


def test_calls_never_save_more_than_the_burst() -> None:
    clock = _Clock()
    budgets = RetryBudgets(ratio=1.0, min_per_s=0.0, burst=2, clock=clock)
    assert budgets.may_retry("crm") is True
    for _ in range(50):
        budgets.called("crm")
    assert [budgets.may_retry("crm") for _ in range(3)] == [True, True, False]
