"""Beat schedules: next run times in the exchange's timezone (not the server's), and the trading day a run is for.

Celery's own ``crontab.remaining_estimate`` / ``is_due`` are asked, with a fixed "now", exactly as
beat asks them; nothing here reimplements the schedule arithmetic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from celery.schedules import crontab

from backup_tasks.catalog.tradingday import parse_day, session_day
from backup_tasks.errors import ConfigError
from backup_tasks.settings import Settings
from backup_tasks.worker.config import QUEUE, TASK_NAMES, beat_schedule, build_config, schedule_settings


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def schedule_for(env: dict[str, str], entry: str, now: datetime) -> crontab:
    """The beat entry's schedule, bound to an app configured from ``env`` and frozen at ``now``."""
    app = Celery("beat-test", set_as_current=False)
    app.conf.update(build_config(env))
    schedule = beat_schedule(schedule_settings(env))[entry]["schedule"]
    schedule.app = app
    schedule.nowfun = lambda: now
    return schedule


def next_run(schedule: crontab, last_run_at: datetime, now: datetime) -> datetime:
    return (now + schedule.remaining_estimate(last_run_at)).astimezone(UTC)


@pytest.fixture
def server_in_another_timezone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's own clock zone is neither UTC nor the exchange's: it must not matter."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("server_in_another_timezone")
@pytest.mark.parametrize(("env", "entry", "now", "last_run_at", "expected"), [
    # Default 02:00 Asia/Kolkata is 20:30 UTC the day before: the UTC date and the IST date differ.
    ({}, "daily-backup", utc(2026, 11, 27, 20, 0), utc(2026, 11, 26, 20, 30), utc(2026, 11, 27, 20, 30)),
    # Just after it ran: the next run is a full day later.
    ({}, "daily-backup", utc(2026, 11, 27, 20, 31), utc(2026, 11, 27, 20, 30), utc(2026, 11, 28, 20, 30)),
    # Across the end of a month and a year, still 02:00 IST.
    ({}, "daily-backup", utc(2026, 12, 31, 19, 0), utc(2026, 12, 30, 20, 30), utc(2026, 12, 31, 20, 30)),
    # A late local time: 23:45 IST is 18:15 UTC the same date; asked at 23:50 IST it is tomorrow's.
    ({"BACKUP_DAILY_AT": "23:45"}, "daily-backup", utc(2026, 11, 27, 18, 0), utc(2026, 11, 26, 18, 15),
     utc(2026, 11, 27, 18, 15)),
    ({"BACKUP_DAILY_AT": "23:45"}, "daily-backup", utc(2026, 11, 27, 18, 20), utc(2026, 11, 27, 18, 15),
     utc(2026, 11, 28, 18, 15)),
    # Just after midnight IST (18:30 UTC the day before).
    ({"BACKUP_DAILY_AT": "00:05"}, "daily-backup", utc(2026, 11, 27, 18, 0), utc(2026, 11, 26, 18, 35),
     utc(2026, 11, 27, 18, 35)),
    # The health check at its own setting.
    ({"BACKUP_HEALTH_AT": "09:10"}, "backup-health", utc(2026, 11, 27, 1, 0), utc(2026, 11, 26, 3, 40),
     utc(2026, 11, 27, 3, 40)),
    ({}, "backup-health", utc(2026, 11, 27, 3, 31), utc(2026, 11, 27, 3, 30), utc(2026, 11, 28, 3, 30)),
    # Another exchange timezone, with daylight saving in force (BST = UTC+1).
    ({"BACKUP_TIMEZONE": "Europe/London"}, "daily-backup", utc(2026, 7, 1, 0, 30), utc(2026, 6, 30, 1, 0),
     utc(2026, 7, 1, 1, 0)),
    ({"BACKUP_TIMEZONE": "Europe/London"}, "daily-backup", utc(2026, 1, 15, 0, 30), utc(2026, 1, 14, 2, 0),
     utc(2026, 1, 15, 2, 0)),
    # APP_TIMEZONE (the trading app's own setting) is honoured when BACKUP_TIMEZONE is not set.
    ({"APP_TIMEZONE": "America/New_York"}, "daily-backup", utc(2026, 11, 27, 6, 0), utc(2026, 11, 26, 7, 0),
     utc(2026, 11, 27, 7, 0)),
])
def test_next_run_time_in_the_configured_timezone(env: dict[str, str], entry: str, now: datetime,
                                                 last_run_at: datetime, expected: datetime) -> None:
    schedule = schedule_for(env, entry, now)
    assert next_run(schedule, last_run_at, now) == expected
    assert not schedule.is_due(last_run_at).is_due
    # One minute after the expected time the entry is due, and beat would sleep about a day after it.
    later = expected + timedelta(minutes=1)
    schedule.nowfun = lambda: later
    due = schedule.is_due(last_run_at)
    assert due.is_due
    assert timedelta(hours=23) < timedelta(seconds=due.next) <= timedelta(hours=24)


@pytest.mark.usefixtures("server_in_another_timezone")
@pytest.mark.parametrize(("env", "now", "last_run_at", "expected"), [
    # The seed's Sunday 03:00, in IST: Saturday 21:30 UTC (2026-11-27 is a Friday).
    ({}, utc(2026, 11, 27, 12, 0), utc(2026, 11, 21, 21, 30), utc(2026, 11, 28, 21, 30)),
    ({}, utc(2026, 11, 28, 21, 31), utc(2026, 11, 28, 21, 30), utc(2026, 12, 5, 21, 30)),
    # Wednesday 23:45 IST is Wednesday 18:15 UTC.
    ({"BACKUP_WEEKLY_AT": "wed 23:45"}, utc(2026, 11, 27, 12, 0), utc(2026, 11, 25, 18, 15),
     utc(2026, 12, 2, 18, 15)),
])
def test_weekly_snapshot_runs_on_the_configured_weekday(env: dict[str, str], now: datetime, last_run_at: datetime,
                                                         expected: datetime) -> None:
    schedule = schedule_for(env, "weekly-snapshot", now)
    assert next_run(schedule, last_run_at, now) == expected
    assert beat_schedule(Settings.from_env(env))["weekly-snapshot"]["task"] == "backup_tasks.weekly"


@pytest.mark.usefixtures("server_in_another_timezone")
def test_a_run_missed_while_beat_was_down_is_due_at_once() -> None:
    now = utc(2026, 11, 30, 6, 0)
    schedule = schedule_for({}, "daily-backup", now)
    # The last run beat remembers was three days ago: it runs once now, then resumes the schedule.
    state = schedule.is_due(utc(2026, 11, 26, 20, 30))
    assert state.is_due
    assert now + timedelta(seconds=state.next) == utc(2026, 11, 30, 20, 30)


def test_schedule_entries_route_to_the_backups_queue() -> None:
    entries = beat_schedule(Settings())
    assert set(entries) == {"daily-backup", "weekly-snapshot", "backup-health"}
    for entry in entries.values():
        assert entry["task"] in TASK_NAMES
        assert entry["options"]["queue"] == QUEUE
        assert isinstance(entry["schedule"], crontab)
    config = build_config({})
    assert config["timezone"] == "Asia/Kolkata"
    assert config["enable_utc"] is True
    assert config["beat_schedule"].keys() == entries.keys()


def test_bad_schedule_settings_are_clear_errors_but_leave_a_startable_config() -> None:
    with pytest.raises(ConfigError, match="BACKUP_DAILY_AT"):
        schedule_settings({"BACKUP_DAILY_AT": "25:00"})
    with pytest.raises(ConfigError, match="BACKUP_TIMEZONE"):
        schedule_settings({"BACKUP_TIMEZONE": "Mars/Olympus"})
    # A broken DATABASE_URL is none of beat's business: tasks report it when they run.
    assert schedule_settings({"DATABASE_URL": "mysql://nope"}).daily_at.hour == 2
    # The worker and beat still get a configuration (the defaults) instead of dying at import.
    assert build_config({"BACKUP_DAILY_AT": "25:00"})["timezone"] == "Asia/Kolkata"


@pytest.mark.parametrize(("now", "expected"), [
    (utc(2026, 11, 27, 10, 0), "2026-11-27"),   # 15:30 IST: the close itself
    (utc(2026, 11, 27, 9, 59), "2026-11-26"),   # 15:29 IST: today's session is not over yet
    (utc(2026, 11, 27, 10, 5), "2026-11-27"),   # 15:35 IST: the app's post-close routine
    (utc(2026, 11, 27, 20, 30), "2026-11-27"),  # 02:00 IST on the 28th: the beat run backs up the 27th
    (utc(2026, 11, 27, 18, 29), "2026-11-27"),  # 23:59 IST
    (utc(2026, 11, 27, 18, 30), "2026-11-27"),  # 00:00 IST on the 28th
    (utc(2027, 1, 1, 0, 0), "2026-12-31"),      # 05:30 IST on New Year's Day
])
def test_session_day_is_the_exchange_local_date_of_the_latest_close(now: datetime, expected: str) -> None:
    assert session_day(now, Settings()) == expected


def test_session_day_follows_market_close_and_timezone_settings() -> None:
    london = Settings.from_env({"BACKUP_TIMEZONE": "Europe/London", "MARKET_CLOSE_TIME": "16:30"})
    assert session_day(utc(2026, 7, 1, 15, 29), london) == "2026-06-30"  # 16:29 BST
    assert session_day(utc(2026, 7, 1, 15, 30), london) == "2026-07-01"  # 16:30 BST
    assert session_day(utc(2026, 1, 15, 16, 30), london) == "2026-01-15"  # 16:30 GMT


def test_parse_day() -> None:
    assert parse_day(" 2026-11-27 ") == "2026-11-27"
    for bad in ("27/11/2026", "2026-13-01", "", "today"):
        with pytest.raises(ConfigError, match="ISO date"):
            parse_day(bad)
