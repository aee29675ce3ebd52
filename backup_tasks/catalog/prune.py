"""Prune: apply the retention plan to the catalog, data before manifest."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest, utcnow
from backup_tasks.catalog.retention import Decision, RetentionPolicy, plan, wal_expiry
from backup_tasks.errors import ConfigError, StorageError, WalArchiveError
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
    # Where expiry stops is known from the manifests alone: then only the directories that can hold
    # older WAL are listed (the local archive; the copy is never listed, it mirrors the same keys).
    keep_from = wal_expiry(kept_snapshots, []).keep_from
    expiry = wal_expiry(kept_snapshots, expirable_names(archive.root, keep_from) if keep_from else [])
    report.wal_reason = expiry.reason
    report.wal_deleted = list(expiry.delete)
    report.wal_freed_bytes = sum(_size(archive.root, name) for name in expiry.delete)
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


#: A segment directory of the archive: timeline and log id (``wal.archive`` layout).
_SEGMENT_DIR = re.compile(r"[0-9A-F]{16}")


def expirable_names(root: Path, keep_from: str) -> list[str]:
    """The archived WAL file names that may lie before ``keep_from``, sorted: what ``wal_expiry`` needs.

    Only the segment directories of ``keep_from``'s log id or older (every timeline) are listed: a
    directory holds the 256 segments of one log id, so every later one holds nothing older, and a
    prune of twelve weeks reads the part of the archive it may delete, not all of it. History files
    are never expired and not listed. Exactly the names ``WalArchive.names`` gives that could expire.
    """
    from backup_tasks.wal.archive import INCOMING_MARK, SUFFIX
    from backup_tasks.wal.names import position

    limit = position(keep_from)[:8]
    found: list[str] = []
    for directory in _listdir(root):
        if _SEGMENT_DIR.fullmatch(directory) and directory[8:] <= limit:
            found += [entry[:-len(SUFFIX)] for entry in _listdir(root / directory)
                      if entry.endswith(SUFFIX) and INCOMING_MARK not in entry]
    return sorted(found)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise WalArchiveError(f"cannot list the WAL archive directory {path}: {exc.strerror}") from None


def _size(root: Path, name: str) -> int:
    from backup_tasks.wal.archive import object_key

    try:
        return os.stat(os.path.join(root, object_key(name))).st_size  # a plain stat: 20,000 of them in a prune
    except FileNotFoundError:
        return 0
