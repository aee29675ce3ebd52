"""Celery tasks: a thin shell over the plain functions the CLI calls.

Each task re-reads its settings from the environment when it runs (a broken ``DATABASE_URL``
fails the task with a clear message, never the worker), tags its Sentry scope, reports progress
as a custom ``PROGRESS`` state that Flower shows, and retries only errors whose type says a retry
can help (``errors.retryable_errors()``); everything else fails at once and is reported once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from celery import Task, chain
from celery.utils import uuid

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.prune import prune as run_prune
from backup_tasks.catalog.tradingday import parse_day, session_day
from backup_tasks.clock import utcnow
from backup_tasks.errors import (
    HealthCheckFailed,
    VerificationFailed,
    retryable_errors,
)
from backup_tasks.logical import dump as dumping
from backup_tasks.logical.verify import verify_backup
from backup_tasks.observe.health import check_health
from backup_tasks.physical.drill import pitr_drill as run_pitr_drill
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.physical.verify import snapshot_to_verify
from backup_tasks.physical.verify import verify_snapshot as run_verify_snapshot
from backup_tasks.settings import Settings
from backup_tasks.wal import dropped
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.restore_points import create_restore_point
from backup_tasks.wal.ship import ship_to_copy
from backup_tasks.worker.app import app
from backup_tasks.worker.config import SHORT_HARD_LIMIT, SHORT_SOFT_LIMIT, retry_policy
from backup_tasks.worker.sentry import capture_problem, set_tags
from backup_tasks.worker.workflow import INCREMENTAL_STEP, release_day, start_post_close

log = logging.getLogger(__name__)


PROGRESS_STATE = "PROGRESS"


#: Custom event type: Flower's event state turns ``task-progress`` into the task state ``PROGRESS``.
PROGRESS_EVENT = "task-progress"


#: Same-phase progress updates are published at most this often (phase changes at once).
PROGRESS_INTERVAL = 1.0


_RETRY = retry_policy()


class BackupTask(Task):
    """Base for every backup task: retry policy from the error tree, progress, Sentry tags."""

    abstract = True
    backup_kind = "dump"
    autoretry_for = retryable_errors()
    max_retries = _RETRY.max_retries
    retry_backoff = _RETRY.backoff
    retry_backoff_max = _RETRY.backoff_max
    retry_jitter = True
    _last_progress: tuple[str, float] = ("", 0.0)

    def settings(self) -> Settings:
        # Tag first: a configuration error is reported with the kind and task it broke.
        set_tags(backup_kind=self.backup_kind, celery_task=self.name)
        settings = Settings.from_env()
        database = settings.source().dbname if settings.database_url else None
        set_tags(backup_database=database)
        return settings

    def progress(self, phase: str, **info: Any) -> None:
        """Publish progress: a ``PROGRESS`` result state (with the details as its meta) and an event
        for Flower. A new phase is published at once, repeats of a phase at most once a second."""
        if info.get("backup_id"):
            set_tags(backup_id=str(info["backup_id"]))
        if self.request.called_directly or not self.request.id:
            return
        now = time.monotonic()
        last_phase, last_time = self._last_progress
        if phase == last_phase and phase != "done" and now - last_time < PROGRESS_INTERVAL:
            return
        self._last_progress = (phase, now)
        meta = {"phase": phase, **info}
        try:
            self.update_state(state=PROGRESS_STATE, meta=meta)
            if self.request.hostname:
                # `result` is what Flower's task list shows; SUCCESS/FAILURE replace it later.
                self.send_event(PROGRESS_EVENT, retry=False, result=json.dumps(meta, sort_keys=True), **meta)
        except Exception as exc:  # progress is informational: never let it fail a backup
            log.warning("could not publish progress (%s): %s", phase, exc)


def _summary(manifest: Manifest, status: str) -> dict[str, Any]:
    return {"status": status, "backup_id": manifest.id, "path": manifest.path, "size_bytes": manifest.size_bytes,
            "sha256": manifest.sha256, "tables": len(manifest.tables), "trading_day": manifest.trading_day}


@app.task(name="backup_tasks.dump", base=BackupTask, bind=True, shared=False)
def dump(self: BackupTask, trading_day: str | None = None, backup_id: str | None = None) -> dict[str, Any]:
    if backup_id:
        set_tags(backup_id=backup_id)
    settings = self.settings()
    day = parse_day(trading_day) if trading_day else None
    try:
        manifest, skipped = dumping.run_dump(settings, trading_day=day, backup_id=backup_id, progress=self.progress)
    except Exception as exc:
        final = not isinstance(exc, self.autoretry_for) or self.request.retries >= self.max_retries
        if day and backup_id and final:
            # The workflow for this day failed: let the next post-close signal try again.
            release_day(settings, day, backup_id)
        raise
    set_tags(backup_id=manifest.id)
    return _summary(manifest, "skipped" if skipped else "complete")


@app.task(name="backup_tasks.verify", base=BackupTask, bind=True, shared=False)
def verify(self: BackupTask, previous: dict[str, Any] | None = None, backup_id: str | None = None) -> dict[str, Any]:
    if isinstance(previous, dict):
        backup_id = previous.get("backup_id") or backup_id
    elif isinstance(previous, str):
        backup_id = previous
    settings = self.settings()
    # "The newest" is resolved first, so the result (and the Sentry tag) names what was verified.
    backup_id = backup_id or catalog.newest(settings.locations()).id
    set_tags(backup_id=backup_id)
    result = verify_backup(settings, backup_id, progress=self.progress)
    if not result.ok:
        raise VerificationFailed(f"backup {backup_id} failed verification: " + "; ".join(result.problems))
    return {"backup_id": backup_id, **asdict(result)}


@app.task(name="backup_tasks.prune", base=BackupTask, bind=True, shared=False,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def prune(self: BackupTask, dry_run: bool = False) -> dict[str, Any]:
    settings = self.settings()
    return asdict(run_prune(settings, dry_run=dry_run))  # the same document as `prune --json`


@app.task(name="backup_tasks.health", base=BackupTask, bind=True, shared=False,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def health(self: BackupTask) -> dict[str, Any]:
    report = check_health(self.settings())
    if report.newest_backup:
        set_tags(backup_id=report.newest_backup)
    if not report.ok:
        raise HealthCheckFailed("backups are unhealthy: " + "; ".join(report.problems))
    return report.__dict__


#: The beat runs wal_ship every minute: a run stops starting new puts after this, so it ends before the next.
WAL_SHIP_SECONDS = 50


@app.task(name="backup_tasks.wal_ship", base=BackupTask, bind=True, shared=False, max_retries=0,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def wal_ship(self: BackupTask) -> dict[str, Any]:
    """Every minute (beat, with BACKUP_COPY_TO): the WAL the copy lacks shipped to it (``wal.ship``), and WAL that
    wal-push dropped (``wal.dropped``) reported to Sentry once. A copy that is down is no failure of this task
    (it would be one Sentry event a minute): the result says so, and health and the metrics report the backlog."""
    settings = self.settings()
    if settings.wal_archive_url is not None:  # BACKUP_DIR is a URL and WAL_ARCHIVE_DIR unset: no archive here
        return {"ok": True, "copy": settings.copy_to, "skipped": "no local WAL archive on this host"}
    archive = WalArchive.for_settings(settings)
    if archive.root is not None:
        report_dropped_wal(archive.root)
    report = ship_to_copy(archive, put_timeout=settings.copy_timeout_seconds, for_seconds=WAL_SHIP_SECONDS)
    if report.error:
        log.warning("wal_ship: the copy %s did not take the backlog: %s", report.copy, report.error)
    return report.to_dict()


def report_dropped_wal(root: Path) -> None:
    """One Sentry event per range of WAL that wal-push dropped and no run has reported yet."""
    records = [r for r in dropped.read(root) if not r.reported]
    for run in dropped.ranges(records):
        capture_problem(f"wal-push DROPPED WAL {dropped.describe(run)} without storing it (--drop-after: neither the "
                        f"archive nor the copy took it): no recovery crosses it until a new snapshot; take one now "
                        f"(`backup-tasks snapshot`)", backup_kind="wal")
    dropped.mark_reported(root, [r.name for r in records])


def _queue_day(day: str, backup_id: str, ids: dict[str, str]) -> None:
    """The sender of ``workflow.start_post_close``: dump -> [incremental snapshot] -> verify -> prune with the
    claimed task ids (the incremental when the claim names one: BACKUP_DAILY_INCREMENTAL)."""
    steps = [dump.si(trading_day=day, backup_id=backup_id).set(task_id=ids["dump"])]
    if ids.get(INCREMENTAL_STEP):
        steps.append(incremental_snapshot.s().set(task_id=ids[INCREMENTAL_STEP]))
    steps += [verify.s().set(task_id=ids["verify"]), prune.si().set(task_id=ids["prune"])]
    chain(*steps).apply_async()


@app.task(name="backup_tasks.post_close", base=BackupTask, bind=True, shared=False,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def post_close(self: BackupTask, day: str) -> dict[str, Any]:
    """Sent by the trading app after the close: ``send_task("backup_tasks.post_close", args=[day])``."""
    trading_day = parse_day(day)  # the caller's mistake first: it is the one to fix
    return start_post_close(self.settings(), trading_day, send=_queue_day, requested_by=self.request.id)


@app.task(name="backup_tasks.daily", base=BackupTask, bind=True, shared=False,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def daily(self: BackupTask) -> dict[str, Any]:
    """The beat schedule's daily run: the same workflow, for the most recent closed session."""
    settings = self.settings()
    return start_post_close(settings, session_day(utcnow(), settings), send=_queue_day,
                            requested_by=self.request.id)


class SnapshotTask(BackupTask):
    abstract = True
    backup_kind = "snapshot"


@app.task(name="backup_tasks.snapshot", base=SnapshotTask, bind=True, shared=False)
def snapshot(self: BackupTask) -> dict[str, Any]:
    manifest = take_snapshot(self.settings(), progress=self.progress)
    set_tags(backup_id=manifest.id)
    return {"status": "complete", "backup_id": manifest.id, "path": manifest.path, "size_bytes": manifest.size_bytes,
            "start_lsn": manifest.start_lsn, "stop_lsn": manifest.stop_lsn}


@app.task(name="backup_tasks.incremental_snapshot", base=SnapshotTask, bind=True, shared=False, max_retries=0)
def incremental_snapshot(self: BackupTask, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The post-close step after the dump: an incremental snapshot; passes the dump's result on to verify.

    Never fails the day: the dump must still be verified and pruned. A failure is reported (Sentry, the
    result's ``incremental_snapshot``) and health judges the snapshots as always. BACKUP_DAILY_INCREMENTAL
    "auto" skips it, with a log line, where no incremental is possible (``chain.readiness``).
    """
    passed = dict(previous) if isinstance(previous, dict) else {}
    passed["incremental_snapshot"] = daily_incremental(self.settings(), progress=self.progress)
    return passed


def daily_incremental(settings: Settings, *, progress: Any = None) -> dict[str, Any]:
    """Take the day's incremental snapshot as BACKUP_DAILY_INCREMENTAL says; what happened, never raised."""
    from backup_tasks.errors import BackupError
    from backup_tasks.physical.chain import incremental_of, readiness

    try:
        if settings.daily_incremental == "off":
            return {"status": "off"}
        if settings.daily_incremental == "auto":
            ready = readiness(settings)
            if ready.parent is None:
                log.info("no incremental snapshot after the dump: %s (BACKUP_DAILY_INCREMENTAL=1 takes a full "
                         "snapshot instead)", ready.reason)
                return {"status": "skipped", "reason": ready.reason}
        manifest = take_snapshot(settings, incremental=True, **({"progress": progress} if progress else {}))
    except BackupError as exc:
        log.warning("the day's incremental snapshot failed: %s", exc)
        capture_problem(f"the day's incremental snapshot failed: {exc}", backup_kind="snapshot")
        return {"status": "failed", "error": str(exc)}
    facts = incremental_of(manifest)
    return {"status": "complete", "backup_id": manifest.id, "size_bytes": manifest.size_bytes,
            "incremental": facts is not None, "chain": list(facts.chain) if facts else [manifest.id],
            "reason": (manifest.snapshot or {}).get("incremental_reason")}


@app.task(name="backup_tasks.verify_snapshot", base=SnapshotTask, bind=True, shared=False)
def verify_snapshot(self: BackupTask, previous: dict[str, Any] | None = None,
                    backup_id: str | None = None) -> dict[str, Any]:
    if isinstance(previous, dict):
        backup_id = previous.get("backup_id") or backup_id
    settings = self.settings()
    # "The newest" is resolved first, so the result (and the Sentry tag) names what was verified, even
    # if a newer snapshot finishes while this one is being restored.
    backup_id = snapshot_to_verify(settings.locations(), backup_id).id
    set_tags(backup_id=backup_id)
    result = run_verify_snapshot(settings, backup_id, progress=self.progress)
    if not result.ok:
        raise VerificationFailed(f"snapshot {backup_id} failed verification: " + "; ".join(result.problems))
    return {"backup_id": backup_id, **result.__dict__}


@app.task(name="backup_tasks.pitr_drill", base=SnapshotTask, bind=True, shared=False)
def pitr_drill(self: BackupTask, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    result = run_pitr_drill(self.settings())
    if result.snapshot_id:
        set_tags(backup_id=result.snapshot_id)
    if not result.ok:
        raise VerificationFailed(f"point-in-time drill to {result.target_time} failed: " + "; ".join(result.problems))
    return result.to_dict()


@app.task(name="backup_tasks.restore_point", base=SnapshotTask, bind=True, shared=False,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def restore_point(self: BackupTask, name: str, trading_day: str | None = None) -> dict[str, Any]:
    point = create_restore_point(self.settings(), name, trading_day=parse_day(trading_day) if trading_day else None)
    return {"name": point.name, "lsn": point.lsn, "created_at": point.created_at}


@app.task(name="backup_tasks.weekly", base=SnapshotTask, bind=True, shared=False,
          soft_time_limit=SHORT_SOFT_LIMIT, time_limit=SHORT_HARD_LIMIT)
def weekly(self: BackupTask) -> dict[str, Any]:
    """The beat schedule's weekly run: snapshot -> verify it -> PITR drill -> prune, as four tasks."""
    self.settings()  # a configuration error fails here, tagged, before anything is queued
    ids = {"snapshot": uuid(), "verify_snapshot": uuid(), "pitr_drill": uuid(), "prune": uuid()}
    chain(
        snapshot.si().set(task_id=ids["snapshot"]),
        verify_snapshot.s().set(task_id=ids["verify_snapshot"]),
        pitr_drill.s().set(task_id=ids["pitr_drill"]),
        prune.si().set(task_id=ids["prune"]),
    ).apply_async()
    return {"status": "started", "tasks": ids}
