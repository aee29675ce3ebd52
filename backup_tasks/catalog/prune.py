"""Prune: apply the retention plan to the catalog, data before manifest."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest, utcnow
from backup_tasks.catalog.retention import Decision, RetentionPolicy, WalExpiry, plan, wal_expiry
from backup_tasks.errors import ConfigError, StorageError
from backup_tasks.locks import hold
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.locations import open_locations
from backup_tasks.wal.archive import WalArchive

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
        expired = [by_id[d.backup_id] for d in decisions if not d.keep]
        for manifest in expired:
            report.freed_bytes += manifest.size_bytes
            report.deleted.append(manifest.id)
        failures = {} if dry_run else delete_backups(storage, expired, {d.backup_id: d.reason for d in decisions})
        kept = [by_id[d.backup_id] for d in decisions if d.keep and d.kind == "snapshot"]
        expire_wal(settings, kept, report)
        if failures:
            raise_failures(failures, storage.location)
        return report


def delete_backups(storage: Storage, expired: list[Manifest], reasons: dict[str, str]) -> dict[str, str]:
    """Delete the expired backups in two batched passes: every data object, then the manifests; the failures.

    Data first: an interruption leaves a manifest without data (pruned again next time), never data
    without a manifest (which prune would never touch again). A backup whose data could not all be
    deleted keeps its manifest for the same reason.
    """
    data = {manifest.id: [*(k for k in (manifest.files or {}) if k != manifest.path), manifest.path]
            for manifest in expired}  # a snapshot is several objects
    failures = storage.delete_many([key for keys in data.values() for key in keys]) if expired else {}
    done = [m for m in expired if not any(key in failures for key in data[m.id])]
    if done:
        failures.update(storage.delete_many([m.key for m in done]))
    for manifest in done:
        if manifest.key not in failures:
            log.info("pruned %s (%s): %s", manifest.id, manifest.path, reasons[manifest.id])
    return failures


def raise_failures(failures: dict[str, str], location: str) -> None:
    shown = "; ".join(f"{key}: {reason}" for key, reason in list(failures.items())[:5])
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    raise StorageError(f"prune could not delete {len(failures)} object(s) in {location}: {shown}{more}; what it "
                       f"could delete is gone, run prune again to finish")


def expire_wal(settings: Settings, kept_snapshots: list[Manifest], report: PruneReport) -> None:
    """Delete archived WAL (and restore point records) older than the oldest kept snapshot needs."""
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
    expiry = wal_expiry(kept_snapshots, [])  # where expiry stops is known from the manifests alone
    if expiry.keep_from is not None:
        expiry, report.wal_freed_bytes = expirable(archive, kept_snapshots, expiry.keep_from)
    report.wal_reason = expiry.reason
    report.wal_deleted = list(expiry.delete)
    if expiry.delete and not report.dry_run:
        failures = archive.delete_many(expiry.delete)  # batched in the copy: DeleteObjects, 1,000 keys a request
        if failures:
            raise_failures(failures, f"the WAL archive {archive.root}")
    if expiry.keep_from is not None and not report.dry_run:
        for point in restore_points(archive):
            if position(point.segment) < position(expiry.keep_from):
                delete_restore_point(archive, point)
    if expiry.delete:
        log.info("%s %d WAL file(s): %s", "would expire" if report.dry_run else "expired", len(expiry.delete),
                 expiry.reason)


def expirable(archive: WalArchive, kept_snapshots: list[Manifest], keep_from: str) -> tuple[WalExpiry, int]:
    """What ``wal_expiry`` deletes from the local archive (the copy mirrors its keys), and the bytes that frees.

    Read from the archive's index (``wal.index``): only the directories that can hold WAL before
    ``keep_from`` give names (a directory holds one log id, so every later one holds nothing older),
    and a directory wholly before it is sized by its cached total, not by a stat per file.
    """
    from backup_tasks.wal.names import position

    limit = position(keep_from)[:8]
    index = archive.index(count_bytes=lambda directory: directory[8:] < limit)
    dirs = [d for d in index.segment_dirs() if d[8:] <= limit]
    expiry = wal_expiry(kept_snapshots, index.names(dirs))
    whole = {d for d in dirs if d[8:] < limit}
    freed = index.wal_bytes(whole) + sum(_size(archive.root, name) for name in expiry.delete if name[:16] not in whole)
    return expiry, freed


def _size(root: Path, name: str) -> int:
    from backup_tasks.wal.archive import object_key

    try:
        return os.stat(os.path.join(root, object_key(name))).st_size  # a plain stat: up to a directory's worth
    except FileNotFoundError:
        return 0
