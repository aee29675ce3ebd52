"""Prune: apply the retention plan to the catalog, data before manifest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest, utcnow
from backup_tasks.catalog.retention import Decision, RetentionPolicy, plan, wal_expiry
from backup_tasks.errors import ConfigError
from backup_tasks.locks import hold
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.locations import open_locations

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    dry_run: bool
    decisions: list[Decision]
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    #: WAL archive expiry (snapshots): files removed (or, with dry_run, that would be) and why.
    wal_deleted: list[str] = field(default_factory=list)
    wal_freed_bytes: int = 0
    wal_reason: str | None = None


def prune(settings: Settings, *, dry_run: bool = False, now: datetime | None = None,
          storage: Storage | None = None) -> PruneReport:
    """Delete what the retention plan expires from ``storage`` (default: the settings' locations), then old WAL."""
    if storage is None:
        storage = open_locations(settings.backup_dir, settings.copy_to)  # deletes from both
    with hold(settings, "prune", what="a prune of this backup directory"):
        manifests = catalog.catalog(storage)
        policy = RetentionPolicy(keep_daily_days=settings.keep_daily_days, keep_weekly=settings.keep_weekly)
        decisions = plan(manifests, now or utcnow(), policy)
        report = PruneReport(dry_run=dry_run, decisions=decisions)
        by_id = {m.id: m for m in manifests}
        for decision in decisions:
            if decision.keep:
                continue
            manifest = by_id[decision.backup_id]
            report.freed_bytes += manifest.size_bytes
            report.deleted.append(manifest.id)
            if dry_run:
                continue
            # Data first: an interruption leaves a manifest without data (pruned again next time),
            # never data without a manifest (which prune would never touch again).
            for key in (manifest.files or {}):  # a snapshot is several objects
                if key != manifest.path:
                    storage.delete(key)
            storage.delete(manifest.path)
            storage.delete(manifest.key)
            log.info("pruned %s (%s): %s", manifest.id, manifest.path, decision.reason)
        kept = [by_id[d.backup_id] for d in decisions if d.keep and d.kind == "snapshot"]
        expire_wal(settings, kept, report)
        return report


def expire_wal(settings: Settings, kept_snapshots: list[Manifest], report: PruneReport) -> None:
    """Delete archived WAL (and restore point records) older than the oldest kept snapshot needs."""
    from backup_tasks.wal.archive import WalArchive
    from backup_tasks.wal.names import position
    from backup_tasks.wal.restore_points import delete_restore_point, restore_points

    try:
        archive = WalArchive(settings.wal_archive, settings.copy_to)  # expires WAL in both
    except ConfigError as exc:
        report.wal_reason = f"WAL archive not pruned: {exc}"
        return
    if not archive.root.is_dir():
        return
    if not report.dry_run:  # temporary files of wal-push runs killed more than an hour ago
        archive.clear_incoming(time.time() - 3600)
    expiry = wal_expiry(kept_snapshots, archive.names())
    report.wal_reason = expiry.reason
    for name in expiry.delete:
        report.wal_deleted.append(name)
        report.wal_freed_bytes += archive.size_of(name)
        if not report.dry_run:
            archive.delete(name)
    if expiry.keep_from is not None and not report.dry_run:
        for point in restore_points(archive):
            if position(point.segment) < position(expiry.keep_from):
                delete_restore_point(archive, point)
    if expiry.delete:
        log.info("%s %d WAL file(s): %s", "would expire" if report.dry_run else "expired", len(expiry.delete),
                 expiry.reason)
