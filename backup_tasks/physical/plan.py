"""Planning a point-in-time recovery: the target, its timeline, and the snapshot to start from.

``plan_restore`` refuses a target outside what the snapshots and the WAL archive cover (saying what
is covered) and, for a time target, works out whether recovery to the end of the archive gives
exactly the state at the target (no commit after it), as PostgreSQL would refuse such a target.

Timelines (``wal.timelines``, ``physical.ranges``). A target is on one timeline, and the plan starts
from a snapshot whose end that timeline's history holds, with ``recovery_target_timeline`` set to
that timeline's number (never ``'latest'``: a number cannot follow a timeline the plan did not
check). Which timeline, unless ``--timeline N`` says:

- the latest point: the archive's newest timeline (what PostgreSQL's ``'latest'`` means);
- a time: a moment can be on several timelines (every moment before a fork is on both branches, and
  after a fork the old timeline may go on beside the new one). The newest timeline whose WAL covers
  that moment is the natural reading of "that moment", so: the archive's newest timeline when it
  covers the time, else the newest timeline that covers it. A time on timeline 1 after the fork of
  timeline 2, while timeline 2 covers that time too, is reached with ``--timeline 1``; the plan's
  notes name the other timelines covering the time;
- a restore point: the same rule, for the timelines whose path holds the point.

Snapshots whose latest verification failed are skipped and named (``RestorePlan.skipped``); the
snapshot can be chosen explicitly (``snapshot_id``, ``restore-pitr --snapshot ID``), a failed one
included, with a warning.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

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
from backup_tasks.physical.chain import chain_problem
from backup_tasks.physical.ranges import SnapshotRange, describe_ranges, format_moment, read_tree, restorable_ranges
from backup_tasks.physical.ranges import snapshot_ranges as snapshot_ranges  # re-exported for older callers
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.tools import find_tool, major_of
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import parse_lsn, position, segment_name, segment_number
from backup_tasks.wal.remote import archive_for_reading
from backup_tasks.wal.restore_points import (
    RestorePoint,
    restore_points,
)
from backup_tasks.wal.timelines import TimelineTree, timeline_for

MAX_WALDUMP_SEGMENTS = 256


@dataclass(frozen=True)
class RecoveryTarget:
    kind: str  # "latest", "time" or "name"
    time: datetime | None = None  # aware
    name: str | None = None
    given: str | None = None  # as the user wrote it
    timeline: int | None = None  # --timeline: the timeline the target is on (None: chosen, module docstring)

    def describe(self) -> str:
        on = f" on timeline {self.timeline}" if self.timeline is not None else ""
        if self.kind == "time" and self.time is not None:
            return f"time {self.time.isoformat()}{on}"
        if self.kind == "name":
            return f"restore point {self.name!r}{on}"
        return f"the latest archived point{on}"


@dataclass(frozen=True)
class SkippedSnapshot:
    """A snapshot planning passed over although it covers the target (``restore-pitr --json``'s ``skipped``)."""

    backup_id: str
    reason: str


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
class RestorePlan:
    snapshot: Manifest
    target: RecoveryTarget
    range: SnapshotRange  # on the timeline recovery targets
    #: True when nothing committed between the target time and the end of the archive: recovering to the
    #: end gives exactly the state at the target (PostgreSQL would refuse a time target it never passes).
    to_end_of_archive: bool = False
    restore_point: RestorePoint | None = None
    #: When a later generation's WAL follows the chosen snapshot's in the archive (a major upgrade): the last
    #: record of its generation, where recovery to its end stops (``recovery_target_lsn``) instead of reading
    #: on into names the new system never wrote or wrote for itself.
    generation_end_lsn: str | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[SkippedSnapshot] = field(default_factory=list)  # failed their latest verification
    warnings: list[str] = field(default_factory=list)  # a failed snapshot chosen explicitly

    @property
    def timeline(self) -> int:
        """The recovery target timeline (``recovery_target_timeline``)."""
        return self.range.timeline

    def recovery_settings(self) -> dict[str, str]:
        values = {"recovery_target_timeline": str(self.timeline)}
        if self.generation_end_lsn and (self.target.kind == "latest" or self.to_end_of_archive):
            values["recovery_target_lsn"] = self.generation_end_lsn
        elif self.target.kind == "time" and not self.to_end_of_archive and self.target.time is not None:
            values["recovery_target_time"] = self.target.time.astimezone(UTC).isoformat(sep=" ")
        elif self.target.kind == "name" and self.target.name is not None:
            values["recovery_target_name"] = self.target.name
        return values


def failed_verification(snapshot: Manifest, known: Mapping[str, Manifest] | None = None) -> str | None:
    """Why planning skips ``snapshot``: its latest verification failed or, given ``known`` (the catalog's snapshots
    by id), it is an incremental whose chain is broken (``physical.chain``); None when neither."""
    verdict = snapshot.verification
    if verdict is None or verdict.ok:
        return chain_problem(snapshot, known) if known is not None else None
    problem = first_line(verdict.problems[0]) if verdict.problems else "no problem recorded"
    return f"its latest verification ({verdict.verified_at}) failed: {problem}"


@dataclass
class _Candidates:
    """The ranges planning may start from, and those it skips (a failed latest verification)."""

    usable: list[SnapshotRange]
    failed: list[SnapshotRange]
    available: str  # every range, for messages
    explicit: str | None = None  # the snapshot chosen with --snapshot
    known: dict[str, Manifest] = field(default_factory=dict)  # every snapshot with a range, by id (chains)

    def failed_where(self, fits: Callable[[SnapshotRange], bool]) -> list[SnapshotRange]:
        return [r for r in self.failed if fits(r)]

    def skipped_newer(self, chosen: SnapshotRange, fitting: list[SnapshotRange]) -> list[SkippedSnapshot]:
        """Those of the failed ``fitting`` newer than ``chosen``: each would have been chosen but for its failure
        (or its broken chain: the plan falls back to the newest intact chain)."""
        found = {r.snapshot.id: SkippedSnapshot(r.snapshot.id, str(failed_verification(r.snapshot, self.known)))
                 for r in fitting if r.snapshot.started > chosen.snapshot.started}
        return list(found.values())

    @staticmethod
    def hint(fitting: list[SnapshotRange]) -> str:
        """For a refusal: the failed snapshots that would have fitted, and how to use one anyway."""
        ids = list(dict.fromkeys(r.snapshot.id for r in fitting))
        if not ids:
            return ""
        return (f". Snapshot {', '.join(ids)} would cover it, but its latest verification failed: verify it again "
                f"(backup-tasks verify --snapshot {ids[-1]}), or restore from it anyway with --snapshot {ids[-1]}")


def _candidates(storage: Storage, ranges: list[SnapshotRange], snapshot_id: str | None,
                warnings: list[str]) -> _Candidates:
    available = describe_ranges(ranges)
    known = {r.snapshot.id: r.snapshot for r in ranges}
    if snapshot_id is None:
        return _Candidates([r for r in ranges if not failed_verification(r.snapshot, known)],
                           [r for r in ranges if failed_verification(r.snapshot, known)], available, known=known)
    try:
        snapshot = catalog.load(storage, snapshot_id)
    except BackupNotFound:
        raise ConfigError(f"--snapshot {snapshot_id}: there is no such backup in {storage.location} "
                          f"(`backup-tasks list` shows the snapshots)") from None
    if snapshot.kind != "snapshot" or not snapshot.restorable:
        what = f"a {snapshot.kind}" if snapshot.kind != "snapshot" else f"a snapshot in state {snapshot.state}"
        raise ConfigError(f"--snapshot {snapshot_id}: that is {what}, not a snapshot point-in-time recovery can "
                          f"start from")
    reason = failed_verification(snapshot, known)
    if reason is not None:  # a broken chain fails the restore itself, naming the missing link
        warnings.append(f"snapshot {snapshot_id} was chosen with --snapshot although {reason}")
    chosen = [r for r in ranges if r.snapshot.id == snapshot_id]
    if not chosen:
        raise TargetOutOfRange(f"snapshot {snapshot_id} restores to nothing: no WAL after it is archived; "
                               f"available: {available}")
    return _Candidates(chosen, [], available, snapshot_id)


def _prefer(timelines: set[int], newest: int) -> int | None:
    """Of the timelines a target is on: the archive's newest, else the newest of them (module docstring)."""
    if newest in timelines:
        return newest
    return max(timelines, default=None)


def plan_restore(settings: Settings, target: RecoveryTarget, *, storage: Storage | None = None,
                 archive: WalArchive | None = None, snapshot_id: str | None = None) -> RestorePlan:
    """The snapshot and timeline to recover ``target`` from (``snapshot_id``: that snapshot, chosen explicitly)."""
    storage = storage or settings.locations()
    archive = archive or archive_for_reading(settings)  # a bucket's wal/ when BACKUP_DIR is one (disaster recovery)
    tree = read_tree(archive)
    ranges = restorable_ranges(storage, archive, tree=tree)
    warnings: list[str] = []
    if snapshot_id is None and not ranges:
        raise BackupNotFound(f"no complete snapshot in {storage.location}; take one with `backup-tasks snapshot`")
    pool = _candidates(storage, ranges, snapshot_id, warnings)
    newest = max(tree.known | {r.timeline for r in ranges})
    if target.timeline is not None and target.timeline not in tree.known:
        raise ConfigError(f"--timeline {target.timeline}: the WAL archive {archive.location} holds timelines "
                          f"{', '.join(map(str, sorted(tree.known))) or 'none'} only")
    try:
        if target.kind == "latest":
            plan = _plan_latest(pool, target, target.timeline or newest, tree, archive)
        elif target.kind == "time":
            plan = _plan_time(settings, archive, pool, target, newest)
        else:
            plan = _plan_name(archive, pool, target, newest, tree)
    except (TargetOutOfRange, RestoreFailed) as exc:
        if archive.copy_problem:  # the copy could not be read: what only it holds was not seen
            raise type(exc)(f"{exc} (the WAL copy could not be read: {archive.copy_problem}; WAL that only the "
                            f"copy holds was not seen: run this again once it answers)") from None
        raise
    if archive.copy_problem:
        warnings.append(f"the WAL copy could not be read ({archive.copy_problem}): planned from "
                        f"{archive.location} alone")
    plan.warnings = warnings
    if target.kind == "latest" or plan.to_end_of_archive:
        _end_of_generation(settings, archive, plan)
    plan.notes += [f"skipped snapshot {s.backup_id}: {s.reason}; choose it anyway with --snapshot {s.backup_id}"
                   for s in plan.skipped]
    return plan


def _plan_latest(pool: _Candidates, target: RecoveryTarget, timeline: int, tree: TimelineTree,
                 archive: WalArchive) -> RestorePlan:
    on_timeline = [r for r in pool.usable if r.timeline == timeline]
    if not on_timeline:
        raise TargetOutOfRange(_unreachable(pool, timeline, tree)
                               + pool.hint(pool.failed_where(lambda r: r.timeline == timeline)))
    chosen = on_timeline[-1]  # the newest snapshot: least WAL to replay
    if chosen.coverage.gap:
        raise RestoreFailed(
            f"WAL segment {chosen.coverage.gap} is missing from the archive {archive.location} although later "
            f"segments are there: recovery to the latest point would silently stop at "
            f"{format_moment(chosen.restorable_until)}. Put the segment back, or restore to a --target-time up "
            f"to that moment. Available: {pool.available}")
    plan = RestorePlan(chosen.snapshot, target, chosen)
    plan.skipped = pool.skipped_newer(chosen, pool.failed_where(lambda r: r.timeline == timeline))
    return plan


def _unreachable(pool: _Candidates, timeline: int, tree: TimelineTree) -> str:
    """Why no snapshot restores onto ``timeline``, and what to do instead."""
    forked = []
    for r in pool.usable:
        fork = tree.fork_point(timeline, r.timeline)
        if fork is not None and r.snapshot.stop_lsn and parse_lsn(r.snapshot.stop_lsn) > fork:
            forked.append(f"snapshot {r.snapshot.id} was taken on timeline {r.timeline} after timeline {timeline} "
                          f"forked off it at {fork >> 32:X}/{fork & 0xFFFFFFFF:X}")
    reached = sorted({r.timeline for r in pool.usable})
    instead = f", or restore on timeline {' or '.join(map(str, reached))} (--timeline {reached[-1]})" if reached else ""
    why = f" ({'; '.join(dict.fromkeys(forked))})" if forked else ""
    which = "no snapshot restores" if pool.explicit is None else f"snapshot {pool.explicit} does not restore"
    return (f"{which} onto timeline {timeline}{why}. Take a snapshot of the server on timeline "
            f"{timeline}{instead}. Available: {pool.available}")


def _plan_time(settings: Settings, archive: WalArchive, pool: _Candidates, target: RecoveryTarget,
               newest: int) -> RestorePlan:
    moment = target.time
    assert moment is not None
    covering = {r.timeline for r in pool.usable if r.covers(moment)}
    timeline = target.timeline if target.timeline is not None else _prefer(covering, newest)
    fitting = [r for r in pool.usable if r.timeline == timeline and r.covers(moment)]
    if not fitting:
        on = f" on timeline {target.timeline}" if target.timeline is not None else ""
        raise TargetOutOfRange(f"cannot restore to {format_moment(moment)}{on}: the snapshots and the WAL archive "
                               f"cover {pool.available}"
                               + pool.hint(pool.failed_where(lambda r: r.covers(moment)
                                                             and target.timeline in (None, r.timeline))))
    chosen = fitting[-1]  # the newest snapshot: least WAL to replay
    plan = RestorePlan(chosen.snapshot, target, chosen)
    plan.skipped = pool.skipped_newer(chosen, pool.failed_where(lambda r: r.timeline == chosen.timeline
                                                                and r.covers(moment)))
    if target.timeline is None and len(covering) > 1:
        others = ", ".join(str(t) for t in sorted(covering - {chosen.timeline}))
        plan.notes.append(f"{format_moment(moment)} is on timeline {chosen.timeline} and on timeline {others}: "
                          f"restoring on timeline {chosen.timeline}; --timeline N chooses another")
    plan.to_end_of_archive = not _commit_after(settings, archive, chosen, moment)
    if plan.to_end_of_archive:
        plan.notes.append(f"no transaction committed between {format_moment(moment)} and the end of the "
                          f"archived WAL on timeline {chosen.timeline}: "
                          f"recovering to the end of the archive gives the state at the target")
    return plan


def _plan_name(archive: WalArchive, pool: _Candidates, target: RecoveryTarget, newest: int,
               tree: TimelineTree) -> RestorePlan:
    points = [p for p in restore_points(archive) if p.name == target.name]
    for point in reversed(points):
        holding = [r for r in pool.usable if _holds_point(r, point, tree)
                   and target.timeline in (None, r.timeline)]
        timeline = _prefer({r.timeline for r in holding}, newest)
        if timeline is not None:
            chosen = [r for r in holding if r.timeline == timeline][-1]
            plan = RestorePlan(chosen.snapshot, target, chosen, restore_point=point)
            plan.skipped = pool.skipped_newer(chosen, [r for r in pool.failed if r.timeline == timeline
                                                       and _holds_point(r, point, tree)])
            return plan
    if points:
        raise TargetOutOfRange(f"restore point {target.name!r} (WAL {points[-1].lsn}, "
                               f"{points[-1].created_at}) is not covered by any snapshot and the archive; "
                               f"available: {pool.available}"
                               + pool.hint(pool.failed_where(lambda r: any(_holds_point(r, p, tree) for p in points))))
    timeline = target.timeline or newest
    on_timeline = [r for r in pool.usable if r.timeline == timeline]
    if not on_timeline:
        raise TargetOutOfRange(_unreachable(pool, timeline, tree))
    chosen = on_timeline[-1]
    plan = RestorePlan(chosen.snapshot, target, chosen)
    plan.notes.append(f"restore point {target.name!r} was not created through backup-tasks: PostgreSQL stops there "
                      f"if it lies in the archived WAL after snapshot {chosen.snapshot.id} on timeline {timeline}")
    return plan


def _holds_point(candidate: SnapshotRange, point: RestorePoint, tree: TimelineTree) -> bool:
    """Whether recovery from ``candidate`` (on its timeline) passes ``point`` within the archived WAL."""
    snap, cov = candidate.snapshot, candidate.coverage
    return bool(snap.stop_segment and position(str(snap.stop_segment)) <= position(point.segment)
                and cov.end_segment and position(cov.end_segment) >= position(point.segment)
                and tree.holds(candidate.timeline, point.timeline, parse_lsn(point.lsn)))


def _commit_after(settings: Settings, archive: WalArchive, chosen: SnapshotRange, moment: datetime) -> bool:
    """Whether the archived WAL on the chosen path holds a commit (or abort) later than ``moment``, from the end."""
    cov, snap = chosen.coverage, chosen.snapshot
    if cov.end_segment is None or not snap.wal_segment_size:
        return False
    size = snap.wal_segment_size
    # Exactly the snapshot's major: another major's pg_waldump reads no record of this WAL (another page
    # magic) and would make "no commit after the target" out of its failure. A missing one is an error
    # naming the package to install, never a guess.
    waldump = find_tool("pg_waldump", exact_major=major_of(snap.server_version), bin_dir=settings.pg_bin_dir,
                        why=f"to read the WAL after snapshot {snap.id} of PostgreSQL {snap.server_version}")
    segno = segment_number(cov.end_segment, size)
    first = segment_number(cov.start_segment, size)
    with tempfile.TemporaryDirectory(prefix="backup-tasks-waldump-") as scratch:
        for _ in range(MAX_WALDUMP_SEGMENTS):
            if segno < first:
                return False
            name = _archived_name(archive, segno, chosen, size)
            if name is None:
                return True
            if archive.trailer(name).completed_at <= moment.timestamp():
                return False  # everything from here back was written before the target
            # Read it with the segment before: a commit record may start there and end in this one.
            previous = _archived_name(archive, segno - 1, chosen, size) if segno > first else None
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


def _end_of_generation(settings: Settings, archive: WalArchive, plan: RestorePlan) -> None:
    """``plan.generation_end_lsn`` when a later generation's WAL follows the chosen snapshot's (see ``RestorePlan``)."""
    from backup_tasks.catalog.generations import boundaries, read_generations
    from backup_tasks.wal.coverage import limit_for

    chosen, snap = plan.range, plan.snapshot
    size = int(snap.wal_segment_size or 0)
    end = chosen.coverage.end_segment
    bounds = boundaries(read_generations(None, archive.primary))
    if not end or not size or not bounds or limit_for(str(snap.start_segment), size, bounds) >= 1 << 64:
        return
    waldump = find_tool("pg_waldump", exact_major=major_of(snap.server_version), bin_dir=settings.pg_bin_dir,
                        why=f"to find the last record of the WAL of PostgreSQL {snap.server_version}")
    with tempfile.TemporaryDirectory(prefix="backup-tasks-waldump-") as scratch:
        archive.fetch(end, Path(scratch) / end)
        result = subprocess.run([str(waldump), "-p", scratch, end, end], capture_output=True, text=True, check=False)
    found = _RECORD_LSN.findall(result.stdout)
    if not found:
        raise RestoreFailed(f"{waldump} found no record in {end}, the last archived segment of the generation of "
                            f"snapshot {snap.id}: {first_line(result.stderr) or f'exit {result.returncode}'}")
    plan.generation_end_lsn = found[-1]
    plan.notes.append(f"the WAL of this server's generation ends in {end} (a major upgrade followed): recovery stops "
                      f"at its last record, {found[-1]}")


_RECORD_LSN = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+), prev")


def _archived_name(archive: WalArchive, segno: int, chosen: SnapshotRange, size: int) -> str | None:
    """The archived segment ``segno`` as the chosen path reads it (its timeline there), or None."""
    name = segment_name(timeline_for(chosen.steps, segno), segno, size)
    return name if archive.exists(name) else None


_COMMIT = re.compile(r"desc: (?:COMMIT|ABORT)(?:_PREPARED)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


#: How pg_waldump says it reached the end of the WAL it was given (the normal end, not a failure): the
#: zeroed rest of the last segment, or the next segment not among the files given.
_END_OF_WAL = ("invalid record length", "could not find file", "could not open file")


def _commit_times(waldump: Path, directory: Path, names: list[str]) -> list[datetime]:
    """The commit and abort times in ``names`` (read from ``directory``); ``RestoreFailed`` when pg_waldump fails.

    pg_waldump exits 1 at the end of the WAL it is given unless the last segment ended with a switch:
    that end is normal. Any other failure (another major's page magic: "could not find a valid record",
    a damaged segment) is raised, never read as "no commit there".
    """
    result = subprocess.run([str(waldump), "-p", str(directory), "-r", "Transaction", names[0], names[-1]],
                            capture_output=True, text=True, check=False, env={**os.environ, "TZ": "UTC"})
    if result.returncode != 0 and not any(end in result.stderr for end in _END_OF_WAL):
        raise RestoreFailed(f"{waldump} could not read the archived WAL {names[0]} to {names[-1]} to find the last "
                            f"commit before the target: {first_line(result.stderr) or f'exit {result.returncode}'}; "
                            f"check that segment in the archive (`backup-tasks wal-fetch {names[-1]} /tmp/x`)")
    return [datetime.fromisoformat(m[1]).replace(tzinfo=UTC) for m in _COMMIT.finditer(result.stdout)]


def latest_target(timeline: int | None = None) -> RecoveryTarget:
    return RecoveryTarget("latest", timeline=timeline)


def time_target(text: str, settings: Settings, timeline: int | None = None) -> RecoveryTarget:
    return RecoveryTarget("time", time=parse_target_time(text, settings), given=text, timeline=timeline)


def name_target(name: str, timeline: int | None = None) -> RecoveryTarget:
    return RecoveryTarget("name", name=name, given=name, timeline=timeline)
