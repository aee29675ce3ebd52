"""backup-tasks: proven, scheduled PostgreSQL backups for the trading stack, as Celery tasks and a CLI.

The package root stays import-light (``wal-push`` and the CLI import it on every call); the Celery
application is created only when asked for, which is what ``celery -A backup_tasks`` does.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `celery -A backup_tasks` looks for an attribute `app` (then `celery`) on the package.
    if name in ("app", "celery_app"):
        from backup_tasks.worker.app import app

        return app
    raise AttributeError(f"module 'backup_tasks' has no attribute {name!r}")
