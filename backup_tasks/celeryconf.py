"""Celery settings derived from the environment, shared by ``celeryconfig.py`` and the in-package default.

Deliberately lenient: only broker, result backend, timezone, limits and schedules are read here,
so a wrong ``DATABASE_URL`` cannot stop a worker from starting; each task validates the full
settings when it runs and fails with a clear error instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery.schedules import crontab

from .errors import ConfigError
from .settings import Settings

QUEUE = "backups"
TASK_NAMES = ("backup_tasks.post_close", "backup_tasks.daily", "backup_tasks.dump", "backup_tasks.verify",
              "backup_tasks.prune", "backup_tasks.health")
#: Short tasks get short limits; dump and verify get the configured ones.
SHORT_SOFT_LIMIT = 600
SHORT_HARD_LIMIT = 660


def schedule_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings for the Celery side, ignoring a broken DATABASE_URL (tasks report it when they run)."""
    env = dict(os.environ if env is None else env)
    for name in ("DATABASE_URL", "VERIFY_DATABASE_URL", "RESTORE_DATABASE_URL"):
        env.pop(name, None)
    return Settings.from_env(env)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    daily, health = settings.daily_at, settings.health_at
    return {
        "daily-backup": {
            "task": "backup_tasks.daily",
            "schedule": crontab(hour=daily.hour, minute=daily.minute),
            "options": {"queue": QUEUE},
        },
        "backup-health": {
            "task": "backup_tasks.health",
            "schedule": crontab(hour=health.hour, minute=health.minute),
            "options": {"queue": QUEUE},
        },
    }


def build_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    try:
        settings = schedule_settings(env)
    except ConfigError:
        settings = Settings()  # the worker must still start; tasks re-read and report the error
    visibility_timeout = settings.task_time_limit + 3600
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.effective_result_backend,
        "broker_connection_retry_on_startup": True,
        # Redis redelivers an unacknowledged message after the visibility timeout: it must exceed the
        # longest hard time limit, or a long dump would be delivered (and run) twice.
        "broker_transport_options": {"visibility_timeout": visibility_timeout},
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout},
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
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(settings),
    }
