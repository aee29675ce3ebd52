"""The schedule ``status`` shows is the one beat runs: the same entries, the same next times as Celery's crontabs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from celery.schedules import crontab

from backup_tasks.observe.schedule import next_runs
from backup_tasks.settings import Settings
from backup_tasks.worker.config import beat_schedule

SETTINGS = [
    Settings(broker_url="memory://"),  # the defaults: Asia/Kolkata, 02:00, sun 03:00, 09:00
    Settings.from_env({"BACKUP_TIMEZONE": "Europe/London", "BACKUP_DAILY_AT": "23:45", "BACKUP_WEEKLY_AT": "wed 00:10",
                       "BACKUP_HEALTH_AT": "06:05"}),
]


def celery_next(settings: Settings, entry: crontab, now: datetime) -> datetime:
    """When Celery beat runs ``entry`` next, seen at ``now`` (the app's timezone as worker.config sets it)."""
    app = Celery(set_as_current=False)
    app.conf.timezone, app.conf.enable_utc = settings.timezone, True
    pinned = crontab(minute=entry._orig_minute, hour=entry._orig_hour, day_of_week=entry._orig_day_of_week,
                     nowfun=lambda: now, app=app)
    return now + pinned.remaining_estimate(now)


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "london"])
def test_next_runs_agree_with_celery_beat(settings: Settings) -> None:
    beat = beat_schedule(settings)  # built from scheduled_runs: the crontabs are what is compared below
    start = datetime(2026, 11, 23, 0, 7, tzinfo=UTC)
    for hours in range(0, 24 * 9, 5):  # every weekday and hour of the day, roughly
        now = start + timedelta(hours=hours)
        for run, at in next_runs(settings, now):
            expected = celery_next(settings, beat[run.name]["schedule"], now)
            assert at == expected, f"{run.name} seen at {now}: ours {at}, beat's {expected}"
