from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bastion.domain.lifetimes import expiry
from bastion.errors import ValidationFailed

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_without_a_longest_lifetime_what_was_asked_stands_and_none_means_until_revoked() -> None:
    assert expiry(NOW, None, None) is None
    assert expiry(NOW, NOW + timedelta(days=400), None) == NOW + timedelta(days=400)


def test_with_a_longest_lifetime_none_gets_the_longest_and_an_earlier_ask_stands() -> None:
    longest = timedelta(days=90)
    assert expiry(NOW, None, longest) == NOW + longest
    assert expiry(NOW, NOW + timedelta(days=7), longest) == NOW + timedelta(days=7)
    assert expiry(NOW, NOW + longest, longest) == NOW + longest


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (NOW - timedelta(seconds=1), "expires_at must be in the future and within ten years"),
        (NOW + timedelta(days=3651), "expires_at must be in the future and within ten years"),
        (
            NOW + timedelta(days=91),
            "expires_at is beyond the longest lifetime this install allows (90 days); ask for an earlier one, or for "
            "none to get the longest",
        ),
    ],
)
def test_a_past_far_or_too_long_ask_is_refused_naming_the_field(asked: datetime, message: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        expiry(NOW, asked, timedelta(days=90))
    assert (refused.value.detail, refused.value.field) == (message, "expires_at")
