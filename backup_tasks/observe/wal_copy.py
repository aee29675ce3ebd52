"""The WAL copy as ``health`` judges it: reachable or not, what it lacks (the backlog), and dropped WAL.

``wal-push`` never waits on ``BACKUP_COPY_TO`` for long: what the copy does not take in time is queued
(``wal.backlog``) and shipped later (``wal.ship``). So the copy can be behind while every segment is
safe in the local archive, and losing this host then loses what the copy lacks. ``read_copy`` reads
that once per health check: whether the copy answers a listing within ``COPY_PROBE_SECONDS`` (a copy
that hangs must not hold the check, nor make it fail to run: ``health`` then judges from
``BACKUP_DIR`` alone), the backlog of the local archive, and the records of WAL that ``wal-push``
dropped (``wal.dropped``). ``assess_copy`` is the pure judge: an unreachable copy, a backlog older
than ``BACKLOG_MAX_AGE`` (the RPO the alerts use) and dropped WAL no newer snapshot makes
irrelevant (``unresolved_drops``, which the metrics count too) are problems.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import BackupError
from backup_tasks.progress import human_size
from backup_tasks.settings import Settings
from backup_tasks.storage.copies import bounded
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal import dropped
from backup_tasks.wal.backlog import COPY_TIMEOUT, EMPTY, Backlog, BacklogCount

#: A copy lacking a segment completed longer ago than this is a problem (the RPO of the lag alert).
BACKLOG_MAX_AGE = timedelta(minutes=15)


@dataclass
class CopyReading:
    """What one health check read about the WAL copy (``read_copy``)."""

    location: str | None  # BACKUP_COPY_TO, None: no copy configured
    error: str | None = None  # why it could not be listed (unreachable, refused, too slow)
    backlog: BacklogCount = EMPTY
    dropped: list[dropped.Dropped] = field(default_factory=list)

    @property
    def reachable(self) -> bool:
        return self.location is not None and self.error is None


def read_copy(settings: Settings) -> CopyReading:
    """Probe BACKUP_COPY_TO (one top-level listing, bounded) and read the local archive's backlog and drops."""
    reading = CopyReading(settings.copy_to)
    if settings.copy_to:
        copy_to = settings.copy_to
        seconds = settings.copy_timeout_seconds or COPY_TIMEOUT
        try:
            bounded(lambda: open_storage(copy_to, setting="BACKUP_COPY_TO").list(recursive=False), seconds,
                    f"listing {copy_to}")
        except (BackupError, OSError) as exc:
            reading.error = str(exc)
    try:
        root = settings.wal_archive
    except BackupError:  # no local archive (BACKUP_DIR is a URL): nothing queued on this host
        return reading
    try:
        reading.backlog = Backlog(root).count()
    except OSError as exc:
        reading.error = reading.error or f"cannot count the copy's backlog in {root}: {exc.strerror or exc}"
    reading.dropped = dropped.read(root)
    return reading


def unresolved_drops(records: list[dropped.Dropped], manifests: list[Manifest]) -> list[dropped.Dropped]:
    """The dropped WAL no restorable snapshot taken since makes irrelevant (``manifests`` oldest first, any kind)."""
    snapshots = [m for m in manifests if m.kind == "snapshot" and m.restorable]
    return dropped.unresolved(records, snapshots[-1].start_segment if snapshots else None)


def assess_copy(reading: CopyReading, manifests: list[Manifest], now: datetime,
                max_age: timedelta = BACKLOG_MAX_AGE) -> tuple[dict[str, Any], list[str]]:
    """Pure: the ``copy`` section of the WAL health and its problems."""
    backlog = reading.backlog
    age = backlog.age_seconds(now.timestamp())
    problems = []
    if reading.error is not None and reading.location is not None:
        problems.append(f"the copy {reading.location} cannot be reached ({reading.error}): judged from BACKUP_DIR "
                        f"alone, and the WAL it lacks waits in the local archive until it answers")
    if backlog.files and age > max_age.total_seconds():
        problems.append(f"the WAL copy lacks {backlog.files} files ({human_size(backlog.bytes)}) queued since "
                        f"{backlog.oldest}, {age / 60:.0f} min behind (more than {max_age.total_seconds() / 60:.0f}): "
                        f"losing this host loses them; check the copy (`backup-tasks check`), then run "
                        f"`backup-tasks wal-ship`")
    unresolved = unresolved_drops(reading.dropped, manifests)
    for run in dropped.ranges(unresolved):
        first = next(r for r in unresolved if r.name == run[0])
        problems.append(f"WAL {dropped.describe(run)} was DROPPED by wal-push at "
                        f"{datetime.fromtimestamp(first.dropped_at).astimezone().isoformat(timespec='seconds')} "
                        f"(pg_wal held {human_size(first.waiting_bytes)}, over --drop-after "
                        f"{human_size(first.drop_after)}, and neither the archive nor the copy took it: "
                        f"{first.reason}): no recovery crosses it; take a snapshot now (`backup-tasks snapshot`)")
    section = {"location": reading.location, "reachable": reading.reachable, "error": reading.error,
               "backlog": {**asdict(backlog), "age_seconds": round(age, 3)},
               "dropped": [{"from": first, "to": last, "files": count}
                           for first, last, count in dropped.ranges(unresolved)]}
    return section, problems
