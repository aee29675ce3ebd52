"""The post-close decision as a plain function: skip the trading day, start its workflow, or resume it.

Decided from the catalog and a claim (never from the clock): the claim names the tasks that run
the day, so a second signal points at them (and ``enqueue post-close --wait`` follows them)
instead of starting a second dump. ``requested_by`` (the post_close task id) lets a redelivered
post_close message finish its own work: it re-sends the same task ids, which is harmless, since
the dump re-checks the catalog under the dump lock.

Celery is not imported here: the task passes in ``send``, which queues dump -> verify -> prune with
the given task ids, so the decision is tested with a plain function in place of the broker. Unless
BACKUP_DAILY_INCREMENTAL=0 an incremental snapshot follows the dump (``INCREMENTAL_STEP``): the day's
PITR starting point, so a restore to the close replays one day of WAL, not a week's.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from backup_tasks.catalog.ids import backup_id_for
from backup_tasks.catalog.manifest import Manifest, existing_for_day, free_backup_id
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.errors import AuthenticationFailed, BackupError, ConfigError, DatabaseMissing, SourceUnavailable
from backup_tasks.locks import claim, release_claim
from backup_tasks.settings import Settings
from backup_tasks.wal.restore_points import RestorePoint, restore_point_for_day
from backup_tasks.worker.client import STEPS
from backup_tasks.worker.sentry import capture_problem

log = logging.getLogger(__name__)

#: The optional step after the dump: an incremental snapshot (BACKUP_DAILY_INCREMENTAL, ``physical.chain``).
INCREMENTAL_STEP = "incremental"

#: Queues the day's steps: ``send(day, backup_id, {"dump": id, "verify": id, "prune": id})``.
Sender = Callable[[str, str, dict[str, str]], None]


def claim_name(settings: Settings, day: str) -> str:
    source = settings.source()
    return f"post-close:{source.server_label}/{source.dbname}:{day}"


def start_post_close(settings: Settings, day: str, *, send: Sender, requested_by: str | None = None) -> dict[str, Any]:
    """Dump, verify and prune the trading day ``day`` as three tasks, unless it is done or in flight."""
    conninfo = settings.source()
    name = claim_name(settings, day)
    # Free now, so the id this answer names is the dump's; two days claimed in the same second still
    # want one id, and the dump (under its lock) then takes the next free second.
    backup_id = free_backup_id(settings.locations(), backup_id_for(conninfo.dbname, "dump", isoformat(utcnow())))
    ids = {step: str(uuid.uuid4()) for step in STEPS}
    if wants_incremental(settings):
        ids[INCREMENTAL_STEP] = str(uuid.uuid4())  # dump -> incremental snapshot -> verify -> prune
    ttl = settings.task_time_limit * 2 + 600
    value = json.dumps({"backup_id": backup_id, "tasks": ids, "by": requested_by}, sort_keys=True)
    held = claim(settings, name, value, ttl=ttl)
    try:
        holder: dict[str, Any] | None = json.loads(held) if held is not None else None
        existing = existing_for_day(settings.locations(), conninfo.dbname, day)
        if existing is not None:
            if holder is None:
                release_claim(settings, name, backup_id)  # ours, just made: nothing will run
            skipped = {"status": "skipped", "reason": "already backed up", "trading_day": day,
                       "backup_id": existing.id, "verified": _verified(existing)}
            if holder is not None and holder.get("backup_id") == existing.id:
                skipped["tasks"] = holder.get("tasks")  # that day's workflow: its verify may still be running
            return skipped
        if holder is not None:
            if not (requested_by and holder.get("by") == requested_by):
                return {"status": "skipped", "reason": "already in progress", "trading_day": day,
                        "backup_id": holder.get("backup_id"), "tasks": holder.get("tasks")}
            backup_id, ids = holder["backup_id"], holder["tasks"]  # our own claim: a redelivered message
        point, point_error = mark_day_end(settings, day)
        send(day, backup_id, ids)
    except BaseException:
        # Nothing was queued: a claim left behind would make every later signal wait for ghosts.
        if held is None:
            release_claim(settings, name, backup_id)
        raise
    log.info("post-close workflow for %s started: %s", day, ids)
    return {"status": "started", "trading_day": day, "backup_id": backup_id, "tasks": ids,
            "restore_point": point.name if point else None, "restore_point_error": point_error}


def wants_incremental(settings: Settings) -> bool:
    """Whether the day's workflow takes an incremental snapshot after the dump (BACKUP_DAILY_INCREMENTAL).

    "auto": only where the server can (17+, summarize_wal on), else not queued at all (one log line): a
    server before 17 keeps the three steps it always had.
    """
    if settings.daily_incremental != "auto":
        return settings.daily_incremental == "on"
    from backup_tasks.physical.chain import readiness

    try:
        ready = readiness(settings)
    except BackupError as exc:
        log.info("no incremental snapshot after the dump: the server could not be asked (%s)", exc)
        return False
    if not ready.possible:
        log.info("no incremental snapshot after the dump: %s", ready.reason)
    return ready.possible


def release_day(settings: Settings, day: str, backup_id: str) -> None:
    """The day's workflow failed for good: drop its claim so that the next post-close signal tries again."""
    release_claim(settings, claim_name(settings, day), backup_id)


def mark_day_end(settings: Settings, day: str) -> tuple[RestorePoint | None, str | None]:
    """Mark the end of the trading day in the WAL (None when the server does not archive WAL).

    A failure here must not cost the day its dump, so it is reported and the workflow goes on. When
    the server cannot be reached at all, the dump fails for the same reason and reports it: one event.
    """
    try:
        return restore_point_for_day(settings, day), None
    except BackupError as exc:
        log.warning("no restore point for %s: %s", day, exc)
        if not isinstance(exc, (SourceUnavailable, AuthenticationFailed, DatabaseMissing, ConfigError)):
            capture_problem(f"no restore point for trading day {day}: {exc}", backup_kind="restore_point")
        return None, str(exc)


def _verified(manifest: Manifest) -> bool | None:
    return None if manifest.verification is None else manifest.verification.ok
