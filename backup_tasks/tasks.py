"""Celery tasks: a thin shell over the plain functions the CLI calls.

Each task re-reads its settings from the environment when it runs (a broken ``DATABASE_URL``
fails the task with a clear message, never the worker), tags its Sentry scope, reports progress
as a custom ``PROGRESS`` state that Flower shows, and retries only errors whose type says a retry
can help.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Task, chain
from celery.utils import uuid

from . import dump as dumping
from .alerts import set_tags
from .celery_app import app
from .celeryconf import SHORT_HARD_LIMIT, SHORT_SOFT_LIMIT
from .errors import HealthCheckFailed, VerificationFailed, retryable_errors
from .health import check_health
from .locks import claim, release_claim
from .manifest import utcnow
from .prune import prune as run_prune
from .settings import Settings
from .verify import verify_backup
from .workflow import parse_day, session_day

log = logging.getLogger(__name__)
PROGRESS_STATE = "PROGRESS"


class BackupTask(Task):
    """Base for every backup task: retry policy from the error tree, progress, Sentry tags."""

    abstract = True
    backup_kind = "dump"
    autoretry_for = retryable_errors()
    max_retries = 5
    retry_backoff = 30
    retry_backoff_max = 600
    retry_jitter = True
    _last_progress = 0.0

    def settings(self) -> Settings:
        settings = Settings.from_env()
        database = settings.source().dbname if settings.database_url else None
        set_tags(backup_kind=self.backup_kind, backup_database=database)
        return settings

    def progress(self, phase: str, **info: Any) -> None:
        """Publish progress at most once a second; Flower shows the state and its meta."""
        if info.get("backup_id"):
            set_tags(backup_id=str(info["backup_id"]))
        if self.request.called_directly or not self.request.id:
            return
        now = time.monotonic()
        if phase not in ("done",) and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        self.update_state(state=PROGRESS_STATE, meta={"phase": phase, **info})


def _summary(manifest: dumping.Manifest, status: str) -> dict[str, Any]:
    return {"status": status, "backup_id": manifest.id, "path": manifest.path, "size_bytes": manifest.size_bytes,
            "sha256": manifest.sha256, "tables": len(manifest.tables), "trading_day": manifest.trading_day}


def _inflight_name(settings: Settings, day: str) -> str:
    return f"post-close:{settings.source().server_label}/{settings.source().dbname}:{day}"


@app.task(name="backup_tasks.dump", base=BackupTask, bind=True)
def dump(self: BackupTask, trading_day: str | None = None, backup_id: str | None = None) -> dict[str, Any]:
    settings = self.settings()
    day = parse_day(trading_day) if trading_day else None
    try:
        manifest, skipped = dumping.run_dump(settings, trading_day=day, backup_id=backup_id, progress=self.progress)
    except Exception as exc:
        final = not isinstance(exc, self.autoretry_for) or self.request.retries >= self.max_retries
        if day and backup_id and final:
            # The workflow for this day failed: let the next post-close signal try again.
            release_claim(settings, _inflight_name(settings, day), backup_id)
        raise
    set_tags(backup_id=manifest.id)
    return _summary(manifest, "skipped" if skipped else "complete")


@app.task(name="backup_tasks.verify", base=BackupTask, bind=True)
def verify(self: BackupTask, previous: dict[str, Any] | None = None, backup_id: str | None = None) -> dict[str, Any]:
    settings = self.settings()
    if isinstance(previous, dict):
        backup_id = previous.get("backup_id") or backup_id
    elif isinstance(previous, str):
        backup_id = previous
    if backup_id:
        set_tags(backup_id=backup_id)
    result = verify_backup(settings, backup_id, progress=self.progress)
    outcome = {"backup_id": backup_id, **result.__dict__}
    if not result.ok:
        raise VerificationFailed(f"backup {backup_id or 'newest'} failed verification: " + "; ".join(result.problems))
    return outcome


@app.task(name="backup_tasks.prune", base=BackupTask, bind=True,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def prune(self: BackupTask, dry_run: bool = False) -> dict[str, Any]:
    settings = self.settings()
    report = run_prune(settings, dry_run=dry_run)
    return {"dry_run": report.dry_run, "deleted": report.deleted, "freed_bytes": report.freed_bytes,
            "decisions": [d.__dict__ for d in report.decisions]}


@app.task(name="backup_tasks.health", base=BackupTask, bind=True,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def health(self: BackupTask) -> dict[str, Any]:
    report = check_health(self.settings())
    if not report.ok:
        raise HealthCheckFailed("backups are unhealthy: " + "; ".join(report.problems))
    return report.__dict__


def start_workflow(settings: Settings, day: str) -> dict[str, Any]:
    """Dump, verify and prune the trading day ``day`` as three tasks, unless it is done or in flight."""
    conninfo = settings.source()
    existing = dumping.existing_for_day(settings, conninfo.dbname, day)
    if existing is not None:
        return {"status": "skipped", "reason": "already backed up", "trading_day": day, "backup_id": existing.id}
    backup_id = dumping.backup_id_for(conninfo.dbname, "dump", utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"))
    ids = {"dump": uuid(), "verify": uuid(), "prune": uuid()}
    ttl = settings.task_time_limit * 2 + 600
    # The claim names the tasks that run this day, so a second signal can point at them
    # (and `enqueue post-close --wait` follow them) instead of starting a second dump.
    value = json.dumps({"backup_id": backup_id, "tasks": ids}, sort_keys=True)
    holder = claim(settings, _inflight_name(settings, day), value, ttl=ttl)
    if holder is not None:
        return {"status": "skipped", "reason": "already in progress", "trading_day": day, **json.loads(holder)}
    chain(
        dump.si(trading_day=day, backup_id=backup_id).set(task_id=ids["dump"]),
        verify.s().set(task_id=ids["verify"]),
        prune.si().set(task_id=ids["prune"]),
    ).apply_async()
    log.info("post-close workflow for %s started: %s", day, ids)
    return {"status": "started", "trading_day": day, "backup_id": backup_id, "tasks": ids}


@app.task(name="backup_tasks.post_close", base=BackupTask, bind=True,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def post_close(self: BackupTask, day: str) -> dict[str, Any]:
    """Sent by the trading app after the close: ``send_task("backup_tasks.post_close", args=[day])``."""
    return start_workflow(self.settings(), parse_day(day))


@app.task(name="backup_tasks.daily", base=BackupTask, bind=True,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def daily(self: BackupTask) -> dict[str, Any]:
    """The beat schedule's daily run: the same workflow, for the most recent closed session."""
    settings = self.settings()
    return start_workflow(settings, session_day(utcnow(), settings))
