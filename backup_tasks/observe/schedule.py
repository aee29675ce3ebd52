"""The beat schedule as plain data, and its next runs in the exchange's timezone.

The schedule is a function of the settings (``BACKUP_DAILY_AT``, ``BACKUP_WEEKLY_AT``,
``BACKUP_HEALTH_AT``, ``BACKUP_TIMEZONE``); ``worker.config.beat_schedule`` turns the same settings
into Celery crontabs. It lives here, below the worker, so ``status`` can say when the next runs are
without importing Celery (a Celery crontab cannot be read without it), and the worker can build its
crontabs from ``scheduled_runs`` (the worker may import this package; the reverse is forbidden).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo

from backup_tasks.settings import Settings


@dataclass(frozen=True)
class ScheduledRun:
    """One beat entry: its name (also the Sentry Crons monitor), the task, what it does, when."""

    name: str
    task: str
    what: str
    at: time  # local time in the exchange's timezone
    weekday: int | None = None  # Monday 0 (as ``datetime.weekday()``); None: every day

    def next_after(self, moment: datetime, zone: tzinfo) -> datetime:
        """The first run strictly after ``moment`` (aware), in ``zone``."""
        local = moment.astimezone(zone)
        day = local.date()
        for offset in range(8):
            candidate = datetime.combine(day + timedelta(days=offset), self.at, tzinfo=zone)
            if candidate > local and (self.weekday is None or candidate.weekday() == self.weekday):
                return candidate
        raise AssertionError("a weekly run always falls within eight days")  # pragma: no cover


def scheduled_runs(settings: Settings) -> list[ScheduledRun]:
    """The beat entries of ``worker.config.beat_schedule``, in the same order."""
    weekday, weekly_at = settings.weekly_at
    return [
        ScheduledRun("weekly-snapshot", "backup_tasks.weekly", "weekly snapshot", weekly_at,
                     weekday),
        ScheduledRun("daily-backup", "backup_tasks.daily", "daily backup", settings.daily_at),
        ScheduledRun("backup-health", "backup_tasks.health", "health check", settings.health_at),
    ]


def next_runs(settings: Settings, now: datetime) -> list[tuple[ScheduledRun, datetime]]:
    """Each scheduled run with its next time after ``now``, soonest first."""
    zone = settings.tz
    return sorted(((run, run.next_after(now, zone)) for run in scheduled_runs(settings)), key=lambda pair: pair[1])
