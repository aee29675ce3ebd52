"""The Celery application: configuration, Sentry in worker and beat, and the task modules."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import beat_init, celeryd_init
from celery.utils.imports import import_from_cwd

from .alerts import init_sentry
from .celeryconf import build_config, schedule_settings
from .errors import ConfigError

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
    try:
        init_sentry(schedule_settings())
    except ConfigError:
        pass  # tasks report configuration errors themselves


# Registers the tasks on `app`.
from . import tasks  # noqa: E402,F401
