"""Celery configuration read by `celery -A backup_tasks worker -Q backups` (and beat, flower) from the
project root.

Everything comes from the environment (CELERY_BROKER_URL, CELERY_RESULT_BACKEND, BACKUP_TIMEZONE,
BACKUP_DAILY_AT, ...; see README). Override individual Celery settings below this line if needed.
"""

from backup_tasks.celeryconf import build_config

globals().update(build_config())
