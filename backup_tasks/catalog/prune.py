"""Prune: apply the retention plan to the catalog, data (and records) before manifest.

With ``BACKUP_OBJECT_LOCK_DAYS`` an expired backup whose objects are still locked is not attempted:
it is reported as *locked until D* (an expected state) and deleted by the first run after D. When
that lock ends is known from the catalog alone (the latest of its writes, plus the lock's days), so
a prune of a locked bucket sends no delete it knows S3 will refuse; a refusal it did not foresee
(a bucket's own default retention, a lock setting changed since) is reported the same way.

Prune plans and deletes this catalog's backups only (``catalog.system``): a backup or record of another
PostgreSQL system (another deployment's, in a shared BACKUP_COPY_TO prefix) is left alone and
reported. And it trusts this host's clock only as far as the locations confirm it
(``retention.clock_doubt``): a clock implausibly ahead refuses the run (``ClockAhead``) before anything is
deleted; ``--dry-run`` reports it (``clock_refusal``) with the plan.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.generations import catalog_records
from backup_tasks.catalog.manifest import Manifest, record_time
from backup_tasks.catalog.retention import (
    ClockDoubt,
    Decision,
    RetentionPolicy,
    WalExpiry,
    clock_doubt,
    plan,
    wal_expiry,
)
from backup_tasks.catalog.system import catalog_system, is_foreign
from backup_tasks.clock import isoformat, parse_time, utcnow
from backup_tasks.errors import ClockAhead, ConfigError, ObjectLocked, StorageError
from backup_tasks.locks import hold
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage, members
from backup_tasks.storage.objectlock import ObjectLock
from backup_tasks.wal.archive import WalArchive

log = logging.getLogger(__name__)


@dataclass
class LockedBackup:
    """An expired backup an Object Lock still holds: kept (with its manifest) until ``locked_until``."""

    backup_id: str
    locked_until: str  # ISO 8601, UTC


@dataclass
class PruneReport:
    dry_run: bool
    decisions: list[Decision]
    #: Expired backups removed (or, with dry_run, that would be); not those in ``locked``.
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    #: Expired, but locked: an expected state, deleted by a run after the date.
    locked: list[LockedBackup] = field(default_factory=list)
    #: WAL archive expiry (snapshots): files removed (or, with dry_run, that would be) and why.
    wal_deleted: list[str] = field(default_factory=list)
    wal_freed_bytes: int = 0
    wal_reason: str | None = None
    #: Expired WAL files whose copy is still locked (kept here too, so the next run finds them), and until when.
    wal_locked: int = 0
    wal_locked_until: str | None = None
    #: Backups of another PostgreSQL system than this catalog's (a shared copy prefix): left alone.
    other_systems: list[str] = field(default_factory=list)
    #: Why a real run would delete nothing (a dry run only: a real one raises ``ClockAhead``).
    clock_refusal: str | None = None


def prune(settings: Settings, *, dry_run: bool = False, now: datetime | None = None,
          storage: Storage | None = None) -> PruneReport:
    """Delete what the retention plan expires from ``storage`` (default: the settings' locations), then old WAL.

    Deletes go through prune's own credentials when set (BACKUP_PRUNE_AWS_*): the workers' may only write.
    """
    if storage is None:
        storage = settings.locations(credentials=settings.prune_credentials)  # deletes from both
    now = now or utcnow()
    with hold(settings, "prune", what="a prune of this backup directory"):
        system = catalog_system(storage)
        everything = catalog.catalog(storage, every_system=True)
        manifests = [m for m in everything if not is_foreign(m.system_identifier, system)]
        foreign = [m for m in everything if is_foreign(m.system_identifier, system)]
        policy = retention_policy(settings)
        # Each generation's newest chain stays until `upgrade --release-old` released it (``catalog.generations``).
        released = catalog_records(storage)[2]
        decisions = plan(manifests, now, policy, released=released)
        report = PruneReport(dry_run=dry_run, decisions=decisions, other_systems=[m.id for m in foreign])
        if foreign:
            log.info("left alone %d backup(s) of other systems than this catalog's (%s): %s", len(foreign), system,
                     ", ".join(f"{m.id} (system {m.system_identifier})" for m in foreign))
        # Only a plan that deletes something asks the locations for their stamps (one listing each).
        doubt = None if all(d.keep for d in decisions) else clock_doubt(manifests, now, policy, newest_stamped(storage),
                                                                       released=released)
        if doubt is not None:
            if not dry_run:
                raise ClockAhead(f"prune refused: {doubt.message}")
            return refused_preview(report, doubt)
        by_id = {m.id: m for m in manifests}
        expired = [by_id[d.backup_id] for d in decisions if not d.keep]
        lock = bucket_lock(settings)
        held = {m.id: until for m in expired if (until := locked_until(storage, m, lock, now)) is not None}
        deletable = [m for m in expired if m.id not in held]
        failures = {} if dry_run else delete_backups(storage, deletable, {d.backup_id: d.reason for d in decisions})
        refused = {key: exc for key, exc in failures.items() if isinstance(exc, ObjectLocked)}
        for manifest in deletable:
            dates = [refused[key].retain_until for key in [*manifest.stored_keys, manifest.key] if key in refused]
            if dates:
                held[manifest.id] = max(dates)
        failed = {key: exc for key, exc in failures.items() if key not in refused}
        for manifest in expired:
            if manifest.id in held:
                report.locked.append(LockedBackup(manifest.id, isoformat(held[manifest.id])))
            elif not any(key in failed for key in [*manifest.stored_keys, manifest.key]):
                report.deleted.append(manifest.id)
                report.freed_bytes += manifest.size_bytes
        for entry in report.locked:
            log.info("%s expired but is locked until %s: a later prune deletes it", entry.backup_id, entry.locked_until)
        # A snapshot the lock still holds stays restorable, so its WAL stays too (health checks from it).
        kept = [by_id[d.backup_id] for d in decisions if (d.keep or d.backup_id in held) and d.kind == "snapshot"]
        expire_wal(settings, kept, report, lock, now)
        if not dry_run:
            delete_orphan_records(storage, system)
        if failed:
            raise_failures(failed, storage.location)
        return report


def refused_preview(report: PruneReport, doubt: ClockDoubt) -> PruneReport:
    """The dry run of a prune the clock stops: the plan, the deletions only the clock decides marked, none done."""
    report.clock_refusal = doubt.message
    report.decisions = [replace(d, reason=f"{d.reason}; but only this host's clock makes it that old: a real run "
                                          f"refuses") if d.backup_id in doubt.on_clock_only else d
                        for d in report.decisions]
    report.wal_reason = "WAL not pruned: this host's clock is in doubt"
    return report


def retention_policy(settings: Settings) -> RetentionPolicy:
    """The retention settings as a policy (BACKUP_CLOCK_TOLERANCE_MINUTES included)."""
    return RetentionPolicy(keep_daily_days=settings.keep_daily_days, keep_weekly=settings.keep_weekly,
                           clock_tolerance=timedelta(minutes=settings.clock_tolerance_minutes))


def newest_stamped(storage: Storage) -> dict[str, datetime]:
    """When each location of the catalog stamped its newest object (S3's LastModified, a file's mtime): the top level
    only, one listing per location; a location holding nothing is left out."""
    found = {}
    for member in members(storage):
        stamps = [obj.mtime for obj in member.list(recursive=False)]
        if stamps:
            found[member.location] = datetime.fromtimestamp(max(stamps), UTC)
    return found


def bucket_lock(settings: Settings) -> ObjectLock | None:
    """The Object Lock prune must respect: BACKUP_OBJECT_LOCK_DAYS when a location is a bucket (directories never
    lock)."""
    locations = [settings.backup_dir, settings.copy_to or ""]
    return settings.object_lock if any(url.startswith("s3://") for url in locations) else None


def locked_until(storage: Storage, manifest: Manifest, lock: ObjectLock | None, now: datetime) -> datetime | None:
    """When an expired backup may be deleted, if that is still ahead: from the catalog (``lock_ends``), else from
    what holds its main object (one request per expired backup: a bucket's own default retention counts too)."""
    until = lock_ends(manifest, lock)
    if until is None or until <= now:
        until = storage.retention(manifest.path)
    return until if until is not None and until > now else None


def lock_ends(manifest: Manifest, lock: ObjectLock | None) -> datetime | None:
    """When the last lock on a backup's objects ends: its latest write (the backup, or a record beside it) plus
    the lock's days. Pure: from the catalog alone."""
    if lock is None:
        return None
    written = [parse_time(manifest.finished_at), *(record_time(key) for key in manifest.record_keys)]
    return max(written) + timedelta(days=lock.days)


def delete_backups(storage: Storage, expired: list[Manifest], reasons: dict[str, str]) -> dict[str, StorageError]:
    """Delete the expired backups in two batched passes: every data object and record, then the manifests; the
    failures.

    Data first: an interruption leaves a manifest without data (pruned again next time), never data
    without a manifest (which prune would never touch again). A backup whose data could not all be
    deleted keeps its manifest for the same reason.
    """
    data = {manifest.id: own_keys(manifest) for manifest in expired}  # a snapshot (and a dump) is several objects
    failures = storage.delete_many([key for keys in data.values() for key in keys]) if expired else {}
    done = [m for m in expired if not any(key in failures for key in data[m.id])]
    if done:
        failures.update(storage.delete_many([m.key for m in done]))
    for manifest in done:
        if manifest.key not in failures:
            log.info("pruned %s (%s): %s", manifest.id, manifest.path, reasons[manifest.id])
    return failures


def own_keys(manifest: Manifest) -> list[str]:
    """The objects a backup's manifest names that are the backup's own (named ``<id>.``, as every object this tool
    stores for it is): a manifest copied from another backup's (by hand, by a test) never takes that one's
    objects with it."""
    keys = manifest.stored_keys
    own = [key for key in keys if key.startswith(f"{manifest.id}.")]
    if len(own) < len(keys):
        log.warning("%s names objects of another backup, left alone: %s", manifest.id,
                    ", ".join(key for key in keys if key not in own))
    return own


def delete_orphan_records(storage: Storage, system: str | None) -> None:
    """Records whose backup is gone (a verdict written while prune deleted its backup): deleted, and whatever
    cannot be yet (locked) is left for a later run. A record of another ``system``'s backup is left alone."""
    orphans = [key for key in catalog.orphan_records(storage)
               if not is_foreign(catalog.record_system(storage, key), system)]
    if orphans:
        failures = storage.delete_many(orphans)
        log.info("deleted %d record(s) of backups no longer in the catalog", len(orphans) - len(failures))


def raise_failures(failures: dict[str, StorageError], location: str) -> None:
    shown = "; ".join(f"{key}: {reason}" for key, reason in list(failures.items())[:5])
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    raise StorageError(f"prune could not delete {len(failures)} object(s) in {location}: {shown}{more}; what it "
                       f"could delete is gone, run prune again to finish")


def expire_wal(settings: Settings, kept_snapshots: list[Manifest], report: PruneReport,
               lock: ObjectLock | None = None, now: datetime | None = None) -> None:
    """Delete archived WAL (and restore point records) older than the oldest kept snapshot needs.

    With a locked bucket copy, a file archived less than the lock's days ago is not attempted (its copy is
    locked; the local file stays too, so the next run finds it): counted in ``report.wal_locked``.
    """
    from backup_tasks.wal.names import position
    from backup_tasks.wal.restore_points import delete_restore_point, restore_points

    try:  # expires WAL in both, the copy with prune's own credentials
        archive = WalArchive.in_directory(settings.wal_archive, settings.copy_to,
                                          copy_credentials=settings.prune_credentials)
    except ConfigError as exc:
        report.wal_reason = f"WAL archive not pruned: {exc}"
        return
    if archive.root is None or not archive.root.is_dir():
        return
    if not report.dry_run:  # temporary files of wal-push runs killed more than an hour ago
        archive.clear_incoming(time.time() - 3600)
    expiry = wal_expiry(kept_snapshots, [])  # where expiry stops is known from the manifests alone
    if expiry.keep_from is not None:
        expiry, report.wal_freed_bytes = expirable(archive, kept_snapshots, expiry.keep_from)
    report.wal_reason = expiry.reason
    names = list(expiry.delete)
    locked_until: dict[str, float] = {}
    if lock is not None and archive.copy is not None and archive.copy.features.object_lock:
        # Archived (so copied) no later than the local file's mtime: its copy's lock ends by mtime + days.
        horizon = (now or utcnow()).timestamp() - lock.days * 86400
        for name in names:
            mtime = _mtime(archive.root, name)
            if mtime > horizon:
                locked_until[name] = mtime + lock.days * 86400
    names = [name for name in names if name not in locked_until]
    failures: dict[str, StorageError] = {}
    if names and not report.dry_run:
        failures = archive.delete_many(names)  # batched in the copy: DeleteObjects, 1,000 keys a request
        for name, exc in list(failures.items()):
            if isinstance(exc, ObjectLocked):
                locked_until[name] = exc.retain_until.timestamp()
                del failures[name]
    kept = locked_until.keys() | failures.keys()
    report.wal_freed_bytes -= sum(_size(archive.root, name) for name in kept)  # still here: freed nothing
    report.wal_deleted = [name for name in names if name not in kept]
    names = report.wal_deleted
    if failures:
        raise_failures(failures, f"the WAL archive {archive.root}")
    if locked_until:
        report.wal_locked = len(locked_until)
        report.wal_locked_until = isoformat(datetime.fromtimestamp(max(locked_until.values()), UTC))
        log.info("%d expired WAL file(s) are locked in %s until %s at the latest: a later prune deletes them",
                 report.wal_locked, archive.copy.location if archive.copy else None, report.wal_locked_until)
    if expiry.keep_from is not None and not report.dry_run:
        for point in restore_points(archive):
            if position(point.segment) < position(expiry.keep_from):
                try:
                    delete_restore_point(archive, point)
                except ObjectLocked:
                    pass  # its copy is locked: the local record stays too, and a later prune deletes both
    if names:
        log.info("%s %d WAL file(s): %s", "would expire" if report.dry_run else "expired", len(names),
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


def _mtime(root: Path, name: str) -> float:
    from backup_tasks.wal.layout import object_key

    try:
        return os.stat(os.path.join(root, object_key(name))).st_mtime
    except FileNotFoundError:
        return 0.0


def _size(root: Path, name: str) -> int:
    from backup_tasks.wal.layout import object_key

    try:
        return os.stat(os.path.join(root, object_key(name))).st_size  # a plain stat: up to a directory's worth
    except FileNotFoundError:
        return 0
