"""Which trading day a run is for (pure: a date string or a clock and the settings in, a day out)."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from backup_tasks.errors import ConfigError
from backup_tasks.settings import Settings


def parse_day(text: str) -> str:
    try:
        return date.fromisoformat(str(text).strip()).isoformat()
    except ValueError:
        raise ConfigError(f"the trading day must be an ISO date like 2026-11-27, got {text!r}") from None


def session_day(now: datetime, settings: Settings) -> str:
    """The exchange-local date of the most recent market close at or before ``now``.

    The 02:00 beat run thus backs up the previous session, and a run after 15:30 backs up today's,
    so the beat run and the post-close hook name the same day and the second one skips.
    """
    local = now.astimezone(settings.tz)
    day = local.date() if local.time() >= settings.market_close else local.date() - timedelta(days=1)
    return day.isoformat()
