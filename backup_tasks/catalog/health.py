"""Health of everything the backups promise: the newest dump, the weekly snapshots, WAL continuity.

The decisions are pure (``assess_dumps``, ``assess_snapshots``, ``assess_wal``: manifests, a WAL
survey and a clock in, named problems out); ``check_health`` gathers their inputs (one catalog
listing, the archive's coverage, a listing of its names only to describe a gap, a few trailers, one
short query to the server) and combines them.

Point-in-time recovery is judged only where it is configured: when the catalog holds a snapshot,
``WAL_ARCHIVE_DIR`` is set, or the WAL archive (``WAL_ARCHIVE_DIR``, else ``<BACKUP_DIR>/wal``) holds a
segment. A dump-only deployment has none of these, so its health is its dumps' alone.

WAL continuity is checked like WAL-G's ``wal-verify``: every segment from the earliest start of a
restorable snapshot to the newest archived segment, on the timelines recovery follows, is *found*,
*missing but in flight* or *lost*. A segment after the newest archived one is never a gap (the
server has not archived that far yet; counted as in flight when the server says it has written past
it). PostgreSQL archives in order, so a hole *below* the newest archived segment can only be in
flight for moments (push-ahead stores the following segments while one is being archived): it is in
flight while the server's archiver has not yet reported archiving that far (``pg_stat_archiver``), or,
when the server cannot tell, while the archived segment right after the hole was completed less than
``IN_FLIGHT_GRACE`` ago. Otherwise it is lost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import utcnow
from backup_tasks.errors import BackupError, StorageError
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import TimelineStep, coverages, timeline_for, timeline_path
from backup_tasks.wal.names import kind_of, position, segment_name, segment_number, timeline_of

#: A dump this young may still be in its verify step: not yet a problem.
VERIFY_GRACE = timedelta(hours=2)

#: The weekly snapshot (BACKUP_WEEKLY_AT) plus a day's grace: the "no snapshot in 8 days" alert
#: (``Settings.health_snapshot_max_age_hours``, BACKUP_HEALTH_SNAPSHOT_MAX_AGE_HOURS).
SNAPSHOT_MAX_AGE = timedelta(days=8)

#: Without the server's word, a hole below the newest archived segment is in flight while the segment
#: archived after it was completed less than this long ago (archive_command retries every minute).
IN_FLIGHT_GRACE = timedelta(minutes=10)

#: Seconds to wait for the server's answer (unless DATABASE_URL sets connect_timeout): health must not hang.
SERVER_CONNECT_TIMEOUT = 3

#: Lost ranges named one per problem line; the rest are counted in one more line (all are in the JSON).
PROBLEM_RANGES = 10

#: Holes whose following segment's trailer is read for its completion time, newest first.
TRAILERS_READ = 50


# --- the report ------------------------------------------------------------------------------------

@dataclass
class HealthReport:
    """What ``health --json`` prints and the Celery task returns: plain JSON values only."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    newest_backup: str | None = None  # the newest dump (these three keys predate the sections)
    newest_finished_at: str | None = None
    verified: bool | None = None
    dump: dict[str, Any] = field(default_factory=dict)
    snapshot: dict[str, Any] = field(default_factory=dict)
    wal: dict[str, Any] = field(default_factory=dict)


@dataclass
class DumpHealth:
    newest: str | None = None
    finished_at: str | None = None
    verified: bool | None = None
    size_bytes: int | None = None
    stored_bytes: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class SnapshotHealth:
    pitr: bool  # point-in-time recovery is configured, so snapshots and WAL are judged
    why: str
    count: int = 0
    newest: str | None = None
    finished_at: str | None = None
    verified: bool | None = None
    wal_from_snapshot: str | None = None  # the restorable one whose WAL starts first: continuity is checked from there
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SegmentRange:
    first: str
    last: str
    segments: int

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.first, "to": self.last, "segments": self.segments}

    def describe(self) -> str:
        return f"segment {self.first}" if self.segments == 1 else \
            f"segments {self.first} to {self.last} ({self.segments})"


@dataclass
class WalHealth:
    checked: bool
    archive: str | None = None
    from_segment: str | None = None  # the earliest start segment of a restorable snapshot
    to_segment: str | None = None  # the newest archived segment on the timelines recovery follows
    unbroken_to: str | None = None  # recovery from that snapshot replays up to here
    found: int = 0
    missing_in_flight: int = 0
    in_flight: list[SegmentRange] = field(default_factory=list)
    lost: list[SegmentRange] = field(default_factory=list)
    timelines: list[int] = field(default_factory=list)  # followed from from_segment
    timeline: int | None = None  # the archive's newest (segments and history files)
    server_timeline: int | None = None
    server_segment: str | None = None  # the segment the server is writing
    server_error: str | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``wal`` section: ``from`` and ``to`` (Python keywords as field names), ranges as from/to/segments."""
        data: dict[str, Any] = {"checked": self.checked, "archive": self.archive, "from": self.from_segment,
                                "to": self.to_segment}
        renamed = ("from_segment", "to_segment")
        data.update((k, v) for k, v in asdict(self).items() if k not in data and k not in renamed)
        data["in_flight"] = [r.to_dict() for r in self.in_flight]
        data["lost"] = [r.to_dict() for r in self.lost]
        return data


def combine(dump: DumpHealth, snapshot: SnapshotHealth, wal: WalHealth) -> HealthReport:
    problems = [*dump.problems, *snapshot.problems, *wal.problems]
    return HealthReport(ok=not problems, problems=problems, newest_backup=dump.newest,
                        newest_finished_at=dump.finished_at, verified=dump.verified, dump=asdict(dump),
                        snapshot=asdict(snapshot), wal=wal.to_dict())


# --- dumps -----------------------------------------------------------------------------------------

def _hours(span: timedelta) -> float:
    return span.total_seconds() / 3600


def _verification_problem(what: str, manifest: Manifest, age: timedelta, grace: timedelta) -> str | None:
    if manifest.verification is None:
        return f"{what} {manifest.id} has never been verified" if age > grace else None
    if not manifest.verification.ok:
        return f"{what} {manifest.id} failed verification: " + "; ".join(manifest.verification.problems)
    return None


def assess_dumps(dumps: list[Manifest], stored_sizes: dict[str, int | None], now: datetime,
                 max_age: timedelta) -> DumpHealth:
    """Pure: judge the newest dump from the manifests (oldest first) and the sizes actually found in storage."""
    if not dumps:
        return DumpHealth(problems=["no backup found in the catalog"])
    newest = dumps[-1]
    health = DumpHealth(newest=newest.id, finished_at=newest.finished_at, size_bytes=newest.size_bytes,
                        stored_bytes=stored_sizes.get(newest.id),
                        verified=None if newest.verification is None else newest.verification.ok)
    problems = health.problems
    age = now - catalog.parse_time(newest.finished_at)
    if age > max_age:
        problems.append(f"newest backup {newest.id} is {_hours(age):.1f} hours old "
                        f"(expected one every {_hours(max_age):.0f} hours)")
    stored = health.stored_bytes
    if stored is None:
        problems.append(f"newest backup {newest.id}: file {newest.path} is missing")
    elif stored == 0 or newest.size_bytes == 0:
        problems.append(f"newest backup {newest.id} is empty (0 bytes)")
    elif stored != newest.size_bytes:
        problems.append(f"newest backup {newest.id} is {stored} bytes, its manifest says {newest.size_bytes}")
    unverified = _verification_problem("newest backup", newest, age, VERIFY_GRACE)
    if unverified:
        problems.append(unverified)
    return health


# --- snapshots -------------------------------------------------------------------------------------

def earliest_start(snapshots: list[Manifest]) -> Manifest | None:
    """The restorable snapshot whose WAL starts first: continuity is checked from there (as prune keeps WAL)."""
    candidates = [m for m in snapshots if m.restorable]
    return min(candidates, key=lambda m: position(str(m.start_segment))) if candidates else None


def pitr_configured(snapshots: list[Manifest], archive_dir_set: bool, archive: str,
                    archive_has_segments: bool) -> tuple[bool, str]:
    """Pure: whether snapshots and WAL are judged at all, and why (a dump-only deployment is not judged on them)."""
    if snapshots:
        return True, f"the catalog holds {len(snapshots)} snapshot(s)"
    if archive_dir_set:
        return True, f"WAL_ARCHIVE_DIR is set ({archive})"
    if archive_has_segments:
        return True, f"the WAL archive {archive} holds archived segments"
    return False, (f"dump-only: no snapshot in the catalog, WAL_ARCHIVE_DIR unset and no WAL in {archive}; "
                   f"snapshots and WAL are not judged")


def assess_snapshots(snapshots: list[Manifest], now: datetime, *, pitr: bool, why: str,
                     max_age: timedelta = SNAPSHOT_MAX_AGE, verify_grace: timedelta = VERIFY_GRACE) -> SnapshotHealth:
    """Pure: the newest snapshot is recent, restorable and verified (``snapshots`` oldest first)."""
    health = SnapshotHealth(pitr=pitr, why=why, count=len(snapshots))
    if not pitr:
        return health
    earliest = earliest_start(snapshots)
    health.wal_from_snapshot = earliest.id if earliest else None
    if not snapshots:
        health.problems.append(f"no snapshot in the catalog although point-in-time recovery is configured ({why}): "
                               f"nothing to replay the WAL onto; take one with `backup-tasks snapshot`")
        return health
    newest = snapshots[-1]
    health.newest, health.finished_at = newest.id, newest.finished_at
    health.verified = None if newest.verification is None else newest.verification.ok
    age = now - catalog.parse_time(newest.finished_at)
    if age > max_age:
        health.problems.append(f"newest snapshot {newest.id} is {age.total_seconds() / 86400:.1f} days old "
                               f"(expected one a week, at most {max_age.total_seconds() / 86400:.0f} days apart)")
    if not newest.restorable:
        health.problems.append(f"newest snapshot {newest.id} cannot be restored (state {newest.state}, WAL start "
                               f"{newest.start_segment or 'not recorded'})")
    unverified = _verification_problem("newest snapshot", newest, age, verify_grace)
    if unverified:
        health.problems.append(unverified)
    return health


def snapshot_verify_grace(settings: Settings) -> timedelta:
    """A snapshot is verified by the task right after it, which may run up to the task time limit."""
    return timedelta(seconds=settings.task_time_limit) + VERIFY_GRACE


# --- WAL continuity --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hole:
    """Missing segments (numbers) below the newest archived one, and when the segment after them was completed."""

    first_segno: int
    last_segno: int
    next_completed_at: float | None  # unix time; None: not read or unreadable


@dataclass(frozen=True)
class ServerWal:
    """What the server says about its WAL, or why it said nothing."""

    label: str
    timeline: int | None = None
    current_segment: str | None = None  # being written (None on a standby)
    archived_through: str | None = None  # pg_stat_archiver.last_archived_wal, when it names a segment
    archiver_failure: str | None = None  # the newest failure, when it is newer than the newest success
    error: str | None = None


@dataclass
class WalSurvey:
    """The inputs of ``assess_wal``, gathered from the archive and the server."""

    archive: str
    available: bool = True
    error: str | None = None  # the archive could not be read
    start_segment: str | None = None
    segment_size: int = 16 << 20
    steps: list[TimelineStep] = field(default_factory=list)
    last_archived: str | None = None
    unbroken_to: str | None = None
    holes: list[Hole] = field(default_factory=list)
    newest_timeline: int | None = None
    server: ServerWal | None = None


def missing_runs(names: set[str], steps: list[TimelineStep], first: int, last: int,
                 segment_size: int) -> list[tuple[int, int]]:
    """Pure: the runs of segment numbers in ``first..last`` missing from ``names`` on the timeline path."""
    runs: list[tuple[int, int]] = []
    run_start: int | None = None
    for segno in range(first, last + 1):
        if segment_name(timeline_for(steps, segno), segno, segment_size) in names:
            if run_start is not None:
                runs.append((run_start, segno - 1))
                run_start = None
        elif run_start is None:
            run_start = segno
    if run_start is not None:
        runs.append((run_start, last))
    return runs


def assess_wal(survey: WalSurvey, now: datetime, grace: timedelta = IN_FLIGHT_GRACE) -> WalHealth:
    """Pure: classify every segment from the survey's start to its newest archived one; compare timelines."""
    size, steps = survey.segment_size, survey.steps
    health = WalHealth(checked=True, archive=survey.archive, from_segment=survey.start_segment,
                       to_segment=survey.last_archived, unbroken_to=survey.unbroken_to,
                       timelines=[s.timeline for s in steps], timeline=survey.newest_timeline)
    server = survey.server
    if server is not None:
        health.server_timeline, health.server_segment, health.server_error = \
            server.timeline, server.current_segment, server.error
    problems = health.problems
    if survey.error:
        problems.append(f"the WAL archive {survey.archive} could not be read: {survey.error}")
        return health
    if not survey.available:
        problems.append(f"the WAL archive {survey.archive} does not exist: no snapshot can be recovered past its end")
    elif survey.start_segment and survey.last_archived is None:
        problems.append(f"the WAL archive {survey.archive} holds no segment on the timeline(s) "
                        f"{', '.join(str(t) for t in health.timelines)} from {survey.start_segment} on")

    def named(first: int, last: int) -> SegmentRange:
        return SegmentRange(segment_name(timeline_for(steps, first), first, size),
                            segment_name(timeline_for(steps, last), last, size), last - first + 1)

    if survey.start_segment and steps:
        first = segment_number(survey.start_segment, size)
        last = segment_number(survey.last_archived, size) if survey.last_archived else first - 1
        through = server.archived_through if server else None
        for hole in survey.holes:
            if through is not None:  # PostgreSQL archives in order: up to here it said "done", past it it has not
                done = min(hole.last_segno, segment_number(through, size))
                if done >= hole.first_segno:
                    health.lost.append(named(hole.first_segno, done))
                if done < hole.last_segno:
                    health.in_flight.append(named(max(done + 1, hole.first_segno), hole.last_segno))
                continue
            recent = hole.next_completed_at is not None and \
                now - datetime.fromtimestamp(hole.next_completed_at, UTC) <= grace
            (health.in_flight if recent else health.lost).append(named(hole.first_segno, hole.last_segno))
        missing = sum(r.segments for r in [*health.in_flight, *health.lost])
        health.found = max(0, last - first + 1 - missing)
        current = server.current_segment if server else None
        if current and timeline_of(current) in health.timelines:  # completed by the server, not archived yet
            tail_first, tail_last = max(first, last + 1), segment_number(current, size) - 1
            if tail_last >= tail_first:
                health.in_flight.append(named(tail_first, tail_last))
        health.missing_in_flight = sum(r.segments for r in health.in_flight)
    for span in health.lost[:PROBLEM_RANGES]:
        problems.append(f"WAL {span.describe()} lost: missing from the archive {survey.archive} while later "
                        f"segments are there (recovery from an older snapshot stops before it)")
    if len(health.lost) > PROBLEM_RANGES:
        more = health.lost[PROBLEM_RANGES:]
        problems.append(f"WAL lost: {len(more)} more missing ranges ({sum(r.segments for r in more)} segments) "
                        f"in the archive {survey.archive}")
    problems.extend(_server_problems(server, survey.newest_timeline))
    return health


def _server_problems(server: ServerWal | None, archive_timeline: int | None) -> list[str]:
    if server is None:
        return []
    if server.error:
        return [f"the server {server.label} did not answer ({server.error}): its timeline was not compared with "
                f"the WAL archive's"]
    found = []
    if server.archiver_failure:
        found.append(f"the server {server.label} fails to archive WAL: {server.archiver_failure}")
    if server.timeline is not None and archive_timeline is not None and server.timeline != archive_timeline:
        if server.timeline > archive_timeline:
            found.append(f"the server {server.label} is on timeline {server.timeline} but the WAL archive's newest is "
                         f"{archive_timeline}: the new timeline is not being archived")
        else:
            found.append(f"the WAL archive holds timeline {archive_timeline}, newer than the server {server.label}'s "
                         f"{server.timeline}: another server archived into it, and recovery to the latest point "
                         f"would follow that timeline")
    return found


# --- gathering -------------------------------------------------------------------------------------

def ask_server(settings: Settings) -> ServerWal:
    """The server's timeline, current segment and archiver state; an unreachable server is an answer, not a crash."""
    import psycopg

    from backup_tasks.postgres.connect import connect
    from backup_tasks.postgres.failures import first_line
    from backup_tasks.wal.setup import archiver_stats

    conninfo = settings.source().with_connect_timeout(SERVER_CONNECT_TIMEOUT)
    label = conninfo.server_label
    try:
        with connect(conninfo) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                current = None
                timeline = int(conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0])
            else:
                current = str(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])
                timeline = timeline_of(current)
            stats = archiver_stats(conn)
    except BackupError as exc:
        return ServerWal(label, error=str(exc))
    except psycopg.Error as exc:
        return ServerWal(label, error=first_line(str(exc)))
    archived = str(stats.get("last_archived_wal") or "")
    failed_at, archived_at = stats.get("last_failed_time"), stats.get("last_archived_time")
    failure = None
    if stats.get("failing"):
        failure = (f"archive_command failed for {stats.get('last_failed_wal')} at {failed_at} (last success: "
                   f"{archived or 'none'} at {archived_at or 'never'}); see the server log")
    return ServerWal(label, timeline=timeline, current_segment=current, archived_through=_segment_part(archived),
                     archiver_failure=failure)


def _segment_part(name: str) -> str | None:
    """The segment a file archived by the server belongs to (a .partial or .backup file: its segment)."""
    try:
        return name[:24] if kind_of(name) in ("segment", "partial", "backup") else None
    except BackupError:
        return None


def survey_wal(archive: WalArchive, earliest: Manifest | None, server: ServerWal | None,
               names: list[str] | None = None) -> WalSurvey:
    """Read what ``assess_wal`` needs: the path from ``earliest``'s start segment, the holes, the newest timeline.

    The archive's names (``names``, else a listing) are read only when there is a gap to describe:
    a healthy archive costs what ``coverages`` costs (the archive's index, not a walk of every name).
    """
    survey = WalSurvey(archive=archive.location, available=archive.available(), server=server)
    if not survey.available:
        return survey
    try:
        # The archive's newest timeline: every timeline after the first has a history file, archived first.
        timelines = [int(h[:8], 16) for h in archive.history_names()] + [timeline_of(n) for n in names or []]
        if earliest is not None:
            start, size = str(earliest.start_segment), int(earliest.wal_segment_size or 0)
            survey.start_segment, survey.segment_size = start, size
            survey.steps = timeline_path(archive, timeline_of(start), size)
            cover = coverages(archive, [(start, size)], names)[0]
            survey.last_archived, survey.unbroken_to = cover.last_archived, cover.end_segment
            if cover.last_archived:
                timelines.append(timeline_of(cover.last_archived))
            if cover.last_archived and cover.gap:
                present = set(archive.segment_names() if names is None else names)
                runs = missing_runs(present, survey.steps, segment_number(start, size),
                                    segment_number(cover.last_archived, size), size)
                for index, (first, last) in enumerate(reversed(runs)):
                    after = segment_name(timeline_for(survey.steps, last + 1), last + 1, size)
                    completed = _completed_at(archive, after) if index < TRAILERS_READ else None
                    survey.holes.insert(0, Hole(first, last, completed))
        survey.newest_timeline = max(timelines, default=None)
    except BackupError as exc:
        survey.error = str(exc)
    return survey


def _completed_at(archive: WalArchive, name: str) -> float | None:
    try:
        return archive.trailer(name).completed_at
    except BackupError:
        return None


def _open_archive(settings: Settings) -> WalArchive:
    from backup_tasks.wal.remote import archive_for_reading  # the bucket's wal/ when BACKUP_DIR is one

    return archive_for_reading(settings)


def check_health(settings: Settings, *, now: datetime | None = None, storage: Storage | None = None,
                 archive: WalArchive | None = None) -> HealthReport:
    """Judge the catalog in ``storage`` and the WAL archive ``archive`` (defaults: the settings' locations)."""
    now = now or utcnow()
    if storage is None:
        storage = settings.locations()
    database = settings.source().dbname if settings.database_url else None
    manifests = catalog.catalog(storage)  # one listing for dumps and snapshots
    dumps = [m for m in manifests if m.kind == "dump" and (database is None or m.database == database)]
    snapshots = [m for m in manifests if m.kind == "snapshot"]
    sizes: dict[str, int | None] = {}
    if dumps:
        try:
            sizes[dumps[-1].id] = storage.size(dumps[-1].path)
        except StorageError:
            sizes[dumps[-1].id] = None
    dump = assess_dumps(dumps, sizes, now, timedelta(hours=settings.health_max_age_hours))

    names: list[str] | None = None  # listed only to tell whether WAL is archived at all, when nothing else says
    archive_error: str | None = None
    try:
        archive = archive or _open_archive(settings)
        if not snapshots and not settings.wal_archive_dir and archive.available():
            names = archive.segment_names()
    except BackupError as exc:
        archive_error = str(exc)
    where = archive.location if archive is not None else str(settings.wal_archive_dir or settings.backup_dir)
    pitr, why = pitr_configured(snapshots, bool(settings.wal_archive_dir), where, bool(names))
    snapshot = assess_snapshots(snapshots, now, pitr=pitr, why=why, verify_grace=snapshot_verify_grace(settings),
                                max_age=timedelta(hours=settings.health_snapshot_max_age_hours))
    if not pitr:
        return combine(dump, snapshot, WalHealth(checked=False))
    server = ask_server(settings) if settings.database_url else None
    if archive is None or archive_error:
        survey = WalSurvey(archive=where, error=archive_error, server=server)
    else:
        survey = survey_wal(archive, earliest_start(snapshots), server, names)
    return combine(dump, snapshot, assess_wal(survey, now))
