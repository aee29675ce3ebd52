"""Celery settings derived from the environment, shared by ``celeryconfig.py`` and the in-package default.

Deliberately lenient: only broker, result backend, timezone, limits, retries and schedules are read
here, so a wrong ``DATABASE_URL`` cannot stop a worker from starting; each task validates the full
settings when it runs and fails with a clear error instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery.schedules import crontab

from backup_tasks.errors import ConfigError
from backup_tasks.observe.schedule import scheduled_runs
from backup_tasks.settings import Settings, env_int

log = logging.getLogger(__name__)


QUEUE = "backups"


TASK_NAMES = ("backup_tasks.post_close", "backup_tasks.daily", "backup_tasks.dump", "backup_tasks.verify",
              "backup_tasks.prune", "backup_tasks.health", "backup_tasks.weekly", "backup_tasks.snapshot",
              "backup_tasks.verify_snapshot", "backup_tasks.pitr_drill", "backup_tasks.restore_point",
              "backup_tasks.wal_ship")


#: Short tasks get short limits; dump and verify get the configured ones.
SHORT_SOFT_LIMIT = 600


SHORT_HARD_LIMIT = 660


#: How far the Redis visibility timeout stays above the longest hard time limit.
VISIBILITY_MARGIN = 3600


#: Environment variables read here (on top of what ``Settings.from_env`` reads).
ENV_VARS = ("CELERY_CONFIG_MODULE", "BACKUP_RETRY_BACKOFF", "BACKUP_MAX_RETRIES")


@dataclass(frozen=True)
class RetryPolicy:
    """Celery's exponential backoff for retryable errors: up to ``backoff * 2**n`` seconds (jittered)."""

    backoff: int = 30
    backoff_max: int = 600
    max_retries: int = 5


def retry_policy(env: Mapping[str, str] | None = None) -> RetryPolicy:
    """``BACKUP_RETRY_BACKOFF`` (seconds, first retry) and ``BACKUP_MAX_RETRIES``; defaults when invalid.

    Read when the task module is imported: a bad value must not keep the worker from starting, so
    it is logged and the default used.
    """
    env = os.environ if env is None else env
    defaults = RetryPolicy()
    try:
        backoff = env_int(env, "BACKUP_RETRY_BACKOFF", defaults.backoff, 1)
        max_retries = env_int(env, "BACKUP_MAX_RETRIES", defaults.max_retries, 0)
    except ConfigError as exc:
        log.error("%s; using the default retry policy (%ss backoff, %d retries)", exc, defaults.backoff,
                  defaults.max_retries)
        return defaults
    return RetryPolicy(backoff=backoff, backoff_max=max(defaults.backoff_max, backoff), max_retries=max_retries)


def schedule_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings for the Celery side, ignoring a broken DATABASE_URL (tasks report it when they run)."""
    env = dict(os.environ if env is None else env)
    for name in ("DATABASE_URL", "VERIFY_DATABASE_URL", "RESTORE_DATABASE_URL"):
        env.pop(name, None)
    return Settings.from_env(env)


#: With BACKUP_COPY_TO, the WAL the copy lacks is shipped every minute (``backup_tasks.wal_ship``); a message
#: the worker could not take within the minute expires: the next one does the same work.
WAL_SHIP_ENTRY = "wal-ship"
WAL_SHIP_EXPIRES = 55


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery crontabs for ``observe.schedule.scheduled_runs`` (the one description of the schedule, which
    ``status`` reads too), in the exchange's timezone (``timezone`` below): crontab hours are local to it; with
    a copy, the WAL shipper every minute (plumbing, not a run ``status`` lists)."""
    entries = {run.name: {"task": run.task, "options": {"queue": QUEUE},
                          # crontab counts Sunday as 0, ours (like datetime.weekday) Monday as 0
                          "schedule": crontab(hour=run.at.hour, minute=run.at.minute, **(
                              {} if run.weekday is None else {"day_of_week": (run.weekday + 1) % 7}))}
               for run in scheduled_runs(settings)}
    if settings.copy_to:
        entries[WAL_SHIP_ENTRY] = {"task": "backup_tasks.wal_ship", "schedule": crontab(minute="*"),
                                   "options": {"queue": QUEUE, "expires": WAL_SHIP_EXPIRES}}
    return entries


def longest_hard_limit(settings: Settings) -> int:
    return max(settings.task_time_limit, SHORT_HARD_LIMIT)


def visibility_timeout(settings: Settings) -> int:
    """Redis redelivers an unacknowledged message after this many seconds: it must exceed every
    task's hard time limit, or a long dump still running would be delivered (and run) a second time."""
    return longest_hard_limit(settings) + VISIBILITY_MARGIN


def build_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    try:
        settings = schedule_settings(env)
    except ConfigError as exc:
        log.error("%s; the worker starts with default settings and each task reports the error", exc)
        settings = Settings()  # the worker must still start; tasks re-read and report the error
    visibility = visibility_timeout(settings)
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.effective_result_backend,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": visibility},
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": settings.timezone,
        "enable_utc": True,
        "task_default_queue": QUEUE,
        "task_routes": {"backup_tasks.*": {"queue": QUEUE}},
        # Acknowledge after the task ran, and give the message back when the worker process dies,
        # so a killed worker's backup is redelivered rather than lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # Flower builds its task list from these events: received/started/succeeded from workers,
        # "sent" from whoever enqueues, and our own task-progress events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(settings),
    }
