"""Sentry: initialisation for worker and beat, scrubbing, and per-task tags.

Nothing secret may leave: local variables are not sent (they hold settings with URLs), and every
outgoing event and check-in is scrubbed of known secret values and of any ``user:password@`` in
URLs before it is sent. Only exceptions become events (via the Celery integration); log lines stay
breadcrumbs, so one failed task is exactly one event.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import unquote, urlsplit

from backup_tasks.conninfo import redact_url
from backup_tasks.settings import Settings
from backup_tasks.worker.config import WAL_SHIP_ENTRY

log = logging.getLogger(__name__)


_secrets: list[str] = []


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        text = redact_url(value)
        for secret in _secrets:
            text = text.replace(secret, "***")
        return text
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def scrub_event(event: dict[str, Any], _hint: dict[str, Any] | None = None) -> dict[str, Any]:
    return _scrub(event)


def init_sentry(settings: Settings) -> bool:
    """Initialise sentry-sdk when ``SENTRY_DSN`` is set; returns whether it is on."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    _secrets[:] = settings.secrets() + _env_secrets()
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=f"backup-tasks@{_version()}",
        integrations=[
            # The per-minute WAL shipper is plumbing: a Crons monitor checked in every minute is noise.
            CeleryIntegration(monitor_beat_tasks=True, propagate_traces=False, exclude_beat_tasks=[WAL_SHIP_ENTRY]),
            LoggingIntegration(level=logging.INFO, event_level=None),
        ],
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        traces_sample_rate=0.0,
        before_send=scrub_event,
        before_breadcrumb=lambda crumb, _hint: _scrub(crumb),
    )
    log.info("Sentry reporting is on (environment %s)", settings.sentry_environment or "default")
    return True


def _env_secrets() -> list[str]:
    names = ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FLOWER_BASIC_AUTH")
    found = [os.environ[n] for n in names if len(os.environ.get(n, "")) >= 3]
    # The Celery side reads its settings without the database URLs (a broken one must not stop the
    # worker), so their passwords are collected here, leniently, whatever the URL's shape.
    for name in ("DATABASE_URL", "VERIFY_DATABASE_URL", "RESTORE_DATABASE_URL", "BACKUP_LOCK_URL"):
        try:
            password = urlsplit(os.environ.get(name, "").strip()).password
        except ValueError:
            continue
        if password and len(password) >= 3:
            found.extend((password, unquote(password)))
    # FLOWER_BASIC_AUTH is "user:password[,user2:password2]": the passwords on their own too.
    for pair in os.environ.get("FLOWER_BASIC_AUTH", "").split(","):
        password = pair.partition(":")[2]
        if len(password) >= 3:
            found.append(password)
    return found


def _version() -> str:
    from backup_tasks import __version__

    return __version__


def set_tags(**tags: str | None) -> None:
    """Tag the current task's Sentry scope (no-op when Sentry is off)."""
    try:
        import sentry_sdk
    except ImportError:  # pragma: no cover - sentry-sdk is a dependency
        return
    if not sentry_sdk.is_initialized():
        return
    for key, value in tags.items():
        if value is not None:
            sentry_sdk.set_tag(key.replace("_", "."), value)


def capture_problem(message: str, **tags: str | None) -> None:
    """Report a problem that is not an exception (never used for task failures: those are events already)."""
    try:
        import sentry_sdk
    except ImportError:  # pragma: no cover
        return
    if sentry_sdk.is_initialized():
        with sentry_sdk.new_scope() as scope:
            for key, value in tags.items():
                if value is not None:
                    scope.set_tag(key.replace("_", "."), value)
            sentry_sdk.capture_message(message, level="error")
