"""How long a credential Bastion mints may live: what was asked, within the install's longest lifetime."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from bastion.errors import ValidationFailed

LONGEST_ASKABLE: Final = timedelta(days=3650)


def expiry(now: datetime, asked: datetime | None, longest: timedelta | None) -> datetime | None:
    """When a token or key minted ``now`` expires: ``asked`` (None: never), within ``longest`` when the install
    sets one (then None means the longest).

    Raises:
        ValidationFailed: ``asked`` is past, beyond ten years, or beyond ``longest`` (field ``expires_at``).
    """
    if asked is not None and not now < asked <= now + LONGEST_ASKABLE:
        raise ValidationFailed("expires_at must be in the future and within ten years", field="expires_at")
    if longest is None:
        return asked
    if asked is None:
        return now + longest
    if asked > now + longest:
        raise ValidationFailed(
            f"expires_at is beyond the longest lifetime this install allows ({_days(longest)}); "
            "ask for an earlier one, or for none to get the longest",
            field="expires_at",
        )
    return asked


def _days(span: timedelta) -> str:
    days = span.total_seconds() / 86400
    return f"{days:g} day" + ("" if days == 1 else "s")
