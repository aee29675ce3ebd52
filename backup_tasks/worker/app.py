"""The Celery application: configuration, Sentry in worker and beat, and the task modules."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import beat_init, celeryd_init
from celery.utils.imports import import_from_cwd

from backup_tasks.errors import ConfigError
from backup_tasks.settings import Settings
from backup_tasks.worker.config import build_config, schedule_settings
from backup_tasks.worker.sentry import init_sentry

log = logging.getLogger(__name__)


app = Celery("backup_tasks")


def _configure() -> None:
    """``celeryconfig`` from the working directory when present (the documented way), else our defaults."""
    name = os.environ.get("CELERY_CONFIG_MODULE", "celeryconfig")
    try:
        import_from_cwd(name)
    except ImportError:
        app.config_from_object(build_config())
    else:
        app.config_from_object(name)


_configure()


@celeryd_init.connect
@beat_init.connect
def _start_sentry(**_: object) -> None:
    """Sentry in the worker (before its pool forks) and in beat; Flower and clients never start it."""
    try:
        settings = schedule_settings()
    except ConfigError as exc:
        # A bad schedule or limit setting must not also switch error reporting off: report with
        # the defaults (each task then fails with this same error, and Sentry gets it).
        log.error("%s", exc)
        settings = Settings(sentry_dsn=os.environ.get("SENTRY_DSN", "").strip() or None,
                            sentry_environment=os.environ.get("SENTRY_ENVIRONMENT", "").strip() or None)
    init_sentry(settings)


# Registers the tasks on `app`.
from backup_tasks.worker import tasks  # noqa: E402,F401
