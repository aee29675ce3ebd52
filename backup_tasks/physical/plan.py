"""Planning a point-in-time recovery: targets, what each snapshot can reach, and the snapshot to use.

``plan_restore`` refuses a target outside what the snapshots and the WAL archive cover (saying what
is covered) and, for a time target, works out whether recovery to the end of the archive gives
exactly the state at the target (no commit after it), as PostgreSQL would refuse such a target.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import parse_moment
from backup_tasks.errors import (
    BackupError,
    BackupNotFound,
    ConfigError,
    RestoreFailed,
    TargetOutOfRange,
)
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.tools import find_tool
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import Coverage, coverages
from backup_tasks.wal.names import position, segment_number
from backup_tasks.wal.remote import archive_for_reading
from backup_tasks.wal.restore_points import (
    RestorePoint,
    restore_points,
)

MAX_WALDUMP_SEGMENTS = 256


@dataclass(frozen=True)
class RecoveryTarget:
    kind: str  # "latest", "time" or "name"
    time: datetime | None = None  # aware
    name: str | None = None
    given: str | None = None  # as the user wrote it

    def describe(self) -> str:
        if self.kind == "time" and self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.kind == "name":
            return f"restore point {self.name!r}"
        return "the latest archived point"


def parse_target_time(text: str, settings: Settings) -> datetime:
    """Any timestamp PostgreSQL accepts (``now()``'s output included); no zone means ``BACKUP_TIMEZONE``."""
    moment = parse_moment(text, settings.tz) or _parse_with_server(text.strip(), settings)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=settings.tz)
    return moment.astimezone(UTC)


def _parse_with_server(raw: str, settings: Settings) -> datetime:
    """Let PostgreSQL itself read forms Python does not know ("Nov 27 2026 3:29pm IST"...)."""
    if settings.database_url:
        try:
            with connect(settings.source()) as conn:
                conn.execute("SELECT set_config('TimeZone', %s, false)", (settings.timezone,))
                value = conn.execute("SELECT %s::timestamptz", (raw,)).fetchone()[0]
                return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        except psycopg.Error as exc:
            raise ConfigError(f"--target-time {raw!r} is not a timestamp PostgreSQL accepts: "
                              f"{first_line(str(exc))}") from None
        except BackupError:
            pass
    raise ConfigError(f"--target-time {raw!r} is not a timestamp I can read; write it like "
                      f"2026-11-23 15:29:59+05:30 (no zone: {settings.timezone})")


@dataclass
class SnapshotRange:
    snapshot: Manifest
    coverage: Coverage
    restorable_from: datetime
    restorable_until: datetime

    def describe(self) -> str:
        gap = f" (WAL segment {self.coverage.gap} is missing after that)" if self.coverage.gap else ""
        return (f"{format_moment(self.restorable_from)} to {format_moment(self.restorable_until)} "
                f"from snapshot {self.snapshot.id}{gap}")


@dataclass
class RestorePlan:
    snapshot: Manifest
    target: RecoveryTarget
    range: SnapshotRange
    #: True when nothing committed between the target time and the end of the archive: recovering to the
    #: end gives exactly the state at the target (PostgreSQL would refuse a time target it never passes).
    to_end_of_archive: bool = False
    restore_point: RestorePoint | None = None
    notes: list[str] = field(default_factory=list)

    def recovery_settings(self) -> dict[str, str]:
        if self.target.kind == "time" and not self.to_end_of_archive and self.target.time is not None:
            return {"recovery_target_time": self.target.time.astimezone(UTC).isoformat(sep=" ")}
        if self.target.kind == "name" and self.target.name is not None:
            return {"recovery_target_name": self.target.name}
        return {}


def format_moment(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


def snapshot_ranges(storage: Storage, archive: WalArchive,
                    snapshots: list[Manifest] | None = None) -> list[SnapshotRange]:
    """What every complete snapshot can restore to, given the archive as it is now (oldest first).

    ``snapshots``: the catalog's snapshots when the caller has read it already (the exporter, per scrape).
    """
    ranges = []
    if snapshots is None:
        snapshots = catalog.catalog(storage, kind="snapshot")
    snaps = [snap for snap in snapshots if snap.restorable and snap.restorable_from]
    # One pass over the archive for all of them (12 weekly snapshots over 100,000+ segments), not one each.
    found = coverages(archive, [(str(s.start_segment), int(s.wal_segment_size or 0)) for s in snaps])
    for snap, cov in zip(snaps, found, strict=True):
        assert snap.restorable_from is not None
        start = datetime.fromisoformat(snap.restorable_from)
        until = start
        if cov.covered_until is not None and cov.end_segment is not None and snap.stop_segment and \
                position(cov.end_segment) >= position(str(snap.stop_segment)):
            until = max(start, cov.covered_until)
        ranges.append(SnapshotRange(snap, cov, start, until))
    return ranges


def describe_ranges(ranges: list[SnapshotRange]) -> str:
    if not ranges:
        return "nothing: there is no complete snapshot"
    return "; ".join(r.describe() for r in ranges)


def plan_restore(settings: Settings, target: RecoveryTarget, *, storage: Storage | None = None,
                 archive: WalArchive | None = None) -> RestorePlan:
    storage = storage or settings.locations()
    archive = archive or archive_for_reading(settings)  # a bucket's wal/ when BACKUP_DIR is one (disaster recovery)
    ranges = snapshot_ranges(storage, archive)
    if not ranges:
        raise BackupNotFound(f"no complete snapshot in {storage.location}; take one with `backup-tasks snapshot`")
    available = describe_ranges(ranges)
    if target.kind == "latest":
        chosen = ranges[-1]
        if chosen.coverage.gap:
            raise RestoreFailed(
                f"WAL segment {chosen.coverage.gap} is missing from the archive {archive.location} although later "
                f"segments are there: recovery to the latest point would silently stop at "
                f"{format_moment(chosen.restorable_until)}. Put the segment back, or restore to a --target-time up "
                f"to that "
                f"moment. Available: {available}")
        return RestorePlan(chosen.snapshot, target, chosen)
    if target.kind == "time":
        assert target.time is not None
        fitting = [r for r in ranges if r.restorable_from <= target.time <= r.restorable_until]
        if not fitting:
            raise TargetOutOfRange(f"cannot restore to {format_moment(target.time)}: the snapshots and the WAL "
                                   f"archive cover "
                                   f"{available}")
        chosen = fitting[-1]  # the newest snapshot: least WAL to replay
        plan = RestorePlan(chosen.snapshot, target, chosen)
        plan.to_end_of_archive = not _commit_after(settings, archive, chosen, target.time)
        if plan.to_end_of_archive:
            plan.notes.append(f"no transaction committed between {format_moment(target.time)} and the end of the "
                              f"archived WAL: "
                              f"recovering to the end of the archive gives the state at the target")
        return plan
    points = [p for p in restore_points(archive) if p.name == target.name]
    for point in reversed(points):
        for candidate in reversed(ranges):
            snap, cov = candidate.snapshot, candidate.coverage
            if snap.stop_segment and position(str(snap.stop_segment)) <= position(point.segment) and \
                    cov.end_segment and position(cov.end_segment) >= position(point.segment):
                return RestorePlan(snap, target, candidate, restore_point=point)
    if points:
        raise TargetOutOfRange(f"restore point {target.name!r} (WAL {points[-1].lsn}, "
                               f"{points[-1].created_at}) is not covered by any snapshot and the archive; "
                               f"available: {available}")
    chosen = ranges[-1]
    plan = RestorePlan(chosen.snapshot, target, chosen)
    plan.notes.append(f"restore point {target.name!r} was not created through backup-tasks: PostgreSQL stops there "
                      f"if it lies in the archived WAL after snapshot {chosen.snapshot.id}")
    return plan


def _commit_after(settings: Settings, archive: WalArchive, chosen: SnapshotRange, moment: datetime) -> bool:
    """Whether the archived WAL holds a commit (or abort) later than ``moment``, scanning back from the end."""
    cov, snap = chosen.coverage, chosen.snapshot
    if cov.end_segment is None or not snap.wal_segment_size:
        return False
    size = snap.wal_segment_size
    try:
        waldump = find_tool("pg_waldump", min_major=int(snap.server_version.split(".")[0]), bin_dir=settings.pg_bin_dir)
    except BackupError:
        return True  # cannot tell: let PostgreSQL decide (it refuses a target it never reaches)
    segno = segment_number(cov.end_segment, size)
    first = segment_number(cov.start_segment, size)
    with tempfile.TemporaryDirectory(prefix="backup-tasks-waldump-") as scratch:
        for _ in range(MAX_WALDUMP_SEGMENTS):
            if segno < first:
                return False
            name = _archived_name(archive, segno, cov, size)
            if name is None:
                return True
            if archive.trailer(name).completed_at <= moment.timestamp():
                return False  # everything from here back was written before the target
            # Read it with the segment before: a commit record may start there and end in this one.
            previous = _archived_name(archive, segno - 1, cov, size) if segno > first else None
            names = [n for n in (previous, name) if n is not None and n[:8] == name[:8]]
            for each in names:
                archive.fetch(each, Path(scratch) / each)
            stamps = _commit_times(waldump.path, Path(scratch), names)
            for each in names:
                os.unlink(Path(scratch) / each)
            if any(stamp > moment for stamp in stamps):
                return True
            segno -= 1
    return True


def _archived_name(archive: WalArchive, segno: int, cov: Coverage, size: int) -> str | None:
    return next((n for n in _names_for(segno, cov, size) if archive.exists(n)), None)


def _names_for(segno: int, cov: Coverage, size: int) -> list[str]:
    from backup_tasks.wal.names import segment_name

    return [segment_name(t, segno, size) for t in sorted(cov.timelines, reverse=True)]


_COMMIT = re.compile(r"desc: (?:COMMIT|ABORT)(?:_PREPARED)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def _commit_times(waldump: Path, directory: Path, names: list[str]) -> list[datetime]:
    result = subprocess.run([str(waldump), "-p", str(directory), "-r", "Transaction", names[0], names[-1]],
                            capture_output=True, text=True, check=False, env={**os.environ, "TZ": "UTC"})
    return [datetime.fromisoformat(m[1]).replace(tzinfo=UTC) for m in _COMMIT.finditer(result.stdout)]


def latest_target() -> RecoveryTarget:
    return RecoveryTarget("latest")


def time_target(text: str, settings: Settings) -> RecoveryTarget:
    return RecoveryTarget("time", time=parse_target_time(text, settings), given=text)


def name_target(name: str) -> RecoveryTarget:
    return RecoveryTarget("name", name=name, given=name)


def random_moment(ranges: list[SnapshotRange], rng: Any) -> datetime | None:
    """A uniformly random moment in the union of the snapshots' ranges."""
    spans = [(r.restorable_from, r.restorable_until) for r in ranges if r.restorable_until > r.restorable_from]
    total = sum((b - a).total_seconds() for a, b in spans)
    if total <= 0:
        return None
    pick = rng.random() * total
    for begin, end in spans:
        length = (end - begin).total_seconds()
        if pick <= length:
            return begin + timedelta(seconds=pick)
        pick -= length
    return spans[-1][1]
