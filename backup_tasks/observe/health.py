"""Health of everything the backups promise: the newest dump, the weekly snapshots, WAL continuity.

One reading, one judge. ``check_health`` reads the facts once, the reading the exporter and
``status`` take (``facts.collect``; ``for_health`` adds every manifest in any state, the newest dumps'
sizes as stored and the WAL ``continuity`` survey), and ``judge`` turns that reading into named
problems. The decisions are pure (``assess_dumps``, ``assess_snapshots``, ``assess_wal``: manifests,
a survey, the server's word and a clock in, named problems out). The server's archiver is read once,
by ``postgres.archiver.read_server_wal``: its ``failing`` is the one the metrics expose. A backup's
verification is judged by ``observe.verdict``, the rule the verification metrics and ``status`` follow:
the newest backup's verdict, and while it has none yet the newest verdict before it (a failure stands
until a newer backup passes; an older backup verified again does not clear it).

Why in ``observe`` and not ``catalog`` (where it was): the verdicts cover the catalog, the WAL
archive and the server together, and are computed from the facts ``observe.facts`` gathers, which
needs ``physical.plan`` for the recovery window, a layer above ``catalog``. In ``catalog`` health had
to gather the same things a second way (its own catalog listing, its own query of the server with
its own timeout), so the metrics and the verdicts could disagree.

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

After a major upgrade (``catalog.generations``) each generation is judged on its own: the WAL of an
older one from its earliest restorable snapshot up to where the next begins (the names pg_upgrade
skipped are no loss), the newest one's against the server. Until the newest generation has a
snapshot, that is a problem of its own ("the new server ... has no snapshot yet: take one").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from backup_tasks.catalog.generations import no_snapshot_problem, without_snapshot
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import parse_time
from backup_tasks.errors import BackupError
from backup_tasks.observe.continuity import WalSurvey, earliest_start
from backup_tasks.observe.facts import CATALOG, INTERNAL, Facts, collect
from backup_tasks.observe.verdict import of_same_series, series_verdict
from backup_tasks.observe.wal_copy import CopyReading, assess_copy, read_copy
from backup_tasks.postgres.archiver import UTC_TEXT, ArchiverStats, ServerWal
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import timeline_for
from backup_tasks.wal.names import kind_of, segment_name, segment_number, timeline_of
from backup_tasks.wal.remote import archive_for_reading

#: A dump this young may still be in its verify step: not yet a problem.
VERIFY_GRACE = timedelta(hours=2)

#: The weekly snapshot (BACKUP_WEEKLY_AT) plus a day's grace: the "no snapshot in 8 days" alert
#: (``Settings.health_snapshot_max_age_hours``, BACKUP_HEALTH_SNAPSHOT_MAX_AGE_HOURS).
SNAPSHOT_MAX_AGE = timedelta(days=8)

#: Without the server's word, a hole below the newest archived segment is in flight while the segment
#: archived after it was completed less than this long ago (archive_command retries every minute).
IN_FLIGHT_GRACE = timedelta(minutes=10)

#: Lost ranges named one per problem line; the rest are counted in one more line (all are in the JSON).
PROBLEM_RANGES = 10


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
    copy: dict[str, Any] | None = None  # BACKUP_COPY_TO: reachable? its backlog, dropped WAL (``wal_copy``)
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


def _verification_problems(noun: str, backups: list[Manifest], age: timedelta, grace: timedelta) -> list[str]:
    """The newest of ``backups`` (oldest first) judged by the rule the metrics and status follow (``verdict``).

    A failure stands until a newer backup passes: while the newest has no verdict yet, the newest
    verdict before it speaks (and the newest is also named once its verify task is overdue).
    """
    verdict = series_verdict(of_same_series(backups, backups[-1]))
    newest, found = verdict.newest, []
    if verdict.pending and age > grace:
        found.append(f"newest {noun} {newest.id} has never been verified")
    if verdict.failed and verdict.judged is not None and verdict.verification is not None:
        problems = "; ".join(verdict.verification.problems)
        if verdict.judged is newest:
            found.append(f"newest {noun} {newest.id} failed verification: {problems}")
        else:
            found.append(f"{noun} {verdict.judged.id} failed verification and no newer {noun} has passed since "
                         f"(the newest, {newest.id}, is not verified yet): {problems}")
    return found


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
    age = now - parse_time(newest.finished_at)
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
    problems.extend(_verification_problems("backup", dumps, age, VERIFY_GRACE))
    return health


# --- snapshots -------------------------------------------------------------------------------------

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
    age = now - parse_time(newest.finished_at)
    if age > max_age:
        health.problems.append(f"newest snapshot {newest.id} is {age.total_seconds() / 86400:.1f} days old "
                               f"(expected one a week, at most {max_age.total_seconds() / 86400:.0f} days apart)")
    if not newest.restorable:
        health.problems.append(f"newest snapshot {newest.id} cannot be restored (state {newest.state}, WAL start "
                               f"{newest.start_segment or 'not recorded'})")
    health.problems.extend(_verification_problems("snapshot", snapshots, age, verify_grace))
    return health


def snapshot_verify_grace(settings: Settings) -> timedelta:
    """A snapshot is verified by the task right after it, which may run up to the task time limit."""
    return timedelta(seconds=settings.task_time_limit) + VERIFY_GRACE


# --- WAL continuity --------------------------------------------------------------------------------

def assess_wal(survey: WalSurvey, server: ServerWal | None, now: datetime,
               grace: timedelta = IN_FLIGHT_GRACE) -> WalHealth:
    """Pure: classify every segment from the survey's start to its newest archived one; compare timelines."""
    size, steps = survey.segment_size, survey.steps
    health = WalHealth(checked=True, archive=survey.archive, from_segment=survey.start_segment,
                       to_segment=survey.last_archived, unbroken_to=survey.unbroken_to,
                       timelines=[s.timeline for s in steps], timeline=survey.newest_timeline)
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
        through = archived_through(server)
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
    if server.archiver is not None and server.archiver.failing:
        found.append(f"the server {server.label} fails to archive WAL: {_archiver_failure(server.archiver)}")
    if server.timeline is not None and archive_timeline is not None and server.timeline != archive_timeline:
        if server.timeline > archive_timeline:
            found.append(f"the server {server.label} is on timeline {server.timeline} but the WAL archive's newest is "
                         f"{archive_timeline}: the new timeline is not being archived")
        else:
            found.append(f"the WAL archive holds timeline {archive_timeline}, newer than the server {server.label}'s "
                         f"{server.timeline}: another server archived into it, and recovery to the latest point "
                         f"would follow that timeline")
    return found


def _archiver_failure(archiver: ArchiverStats) -> str:
    def text(moment: datetime | None) -> str | None:  # as the server gave it (``archiver_stats``)
        return None if moment is None else moment.strftime(UTC_TEXT)

    return (f"archive_command failed for {archiver.last_failed_wal} at {text(archiver.last_failed_at)} (last "
            f"success: {archiver.last_archived_wal or 'none'} at {text(archiver.last_archived_at) or 'never'}); "
            f"see the server log")


def archived_through(server: ServerWal | None) -> str | None:
    """The segment up to which the server says it archived (a .partial or .backup file: its segment)."""
    name = server.archiver.last_archived_wal if server and server.archiver else None
    try:
        return name[:24] if name and kind_of(name) in ("segment", "partial", "backup") else None
    except BackupError:
        return None


# --- one reading, one judge -------------------------------------------------------------------------

def judge(facts: Facts, settings: Settings, database: str | None, copy: CopyReading | None = None) -> HealthReport:
    """The verdicts on one reading (``collect(for_health=True)``); ``database``: judge that database's dumps only;
    ``copy``: the WAL copy as ``read_copy`` found it (its problems are the WAL section's).

    A catalog that could not be read, or a reading that failed unforeseen, is raised as it was met: the
    command and the task fail with that error's exit code and retry rule, as they always have.
    """
    for source in facts.sources:
        if source.name in (CATALOG, INTERNAL) and not source.ok and source.cause is not None:
            raise source.cause
    if facts.continuity is None:
        raise ValueError("judge() needs the facts of collect(for_health=True)")
    now = facts.collected_at
    dumps = [m for m in facts.manifests if m.kind == "dump" and (database is None or m.database == database)]
    snapshots = [m for m in facts.manifests if m.kind == "snapshot"]
    dump = assess_dumps(dumps, facts.stored_sizes, now, timedelta(hours=settings.health_max_age_hours))
    survey = facts.continuity
    pitr, why = pitr_configured(snapshots, bool(settings.wal_archive_dir), survey.archive, survey.holds_segments)
    snapshot = assess_snapshots(snapshots, now, pitr=pitr, why=why, verify_grace=snapshot_verify_grace(settings),
                                max_age=timedelta(hours=settings.health_snapshot_max_age_hours))
    missing = without_snapshot(facts.generations, snapshots)
    if missing is not None:
        snapshot.problems.insert(0, no_snapshot_problem(missing))
    server = facts.server
    if server is not None and not facts.continuity_is_newest:  # the server writes the new generation's WAL
        server = replace(server, current_segment=None)
    wal = assess_wal(survey, server, now) if pitr else WalHealth(checked=False)
    if pitr:
        for older in facts.older_continuity:  # an older generation's way back: lost WAL there is lost too
            judged = assess_wal(older, None, now)
            wal.lost.extend(judged.lost)
            wal.problems.extend(judged.problems)
    if copy is not None:
        wal.copy, problems = assess_copy(copy, facts.manifests, now)
        wal.problems.extend(problems)
    return combine(dump, snapshot, wal)


def check_health(settings: Settings, *, now: datetime | None = None, storage: Storage | None = None,
                 archive: WalArchive | None = None) -> HealthReport:
    """Judge the catalog in ``storage`` and the WAL archive ``archive`` (defaults: the locations a restore reads).

    A copy (BACKUP_COPY_TO) that does not answer is a problem, never a reason not to judge: the defaults
    are then BACKUP_DIR and the WAL archive alone.
    """
    database = settings.source().dbname if settings.database_url else None  # a bad DATABASE_URL stops here
    copy = read_copy(settings)
    if settings.copy_to and not copy.reachable:
        alone = replace(settings, copy_to=None)
        storage = storage or alone.locations()
        archive = archive or archive_for_reading(alone)
    facts = collect(settings, storage=storage, archive=archive, now=now, for_health=True)
    return judge(facts, settings, database, copy)
