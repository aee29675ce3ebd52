"""One reading of the backups' state from our own records: what ``metrics``, ``status`` and the page show,
and what ``health`` judges.

What a reading costs (``collect``), whatever the archive's size:

- the catalog: one top-level listing of ``BACKUP_DIR`` and its manifests (the number of backups);
- the WAL archive's state file (``wal.state``): one small file, the newest segment per location;
- with snapshots in the catalog, their WAL coverage on every timeline each restores onto
  (``physical.ranges.restorable_ranges``): the local archive's segment runs, its history files and one
  trailer per distinct end (cheap at 100,000 segments with the index of ``wal.coverage``); never a
  listing of the copy;
- with ``DATABASE_URL``, the server's timeline, current segment and ``pg_stat_archiver`` row
  (``postgres.archiver.read_server_wal``: a down server costs ``SERVER_TIMEOUT`` at most).

A health check reads the same facts, and a little more (``collect(for_health=True)``): every manifest
in any state, the size as stored of each database's newest dump, and the WAL continuity survey
(``continuity``), from the locations a restore reads (BACKUP_DIR with its copy, the bucket's ``wal/``
when BACKUP_DIR is one) instead of the local archive and its state file. ``health`` judges that one
reading; nothing it judges is read a second way.

Each source is reported as read or not (``SourceStatus``). The facts of a source that failed are left
out, never carried over from an earlier reading. ``up`` is whether our own sources were read (catalog,
WAL archive, state file); the server is a source apart: a database that does not answer loses the
``pg_stat_archiver`` facts, not the backup facts (the backups are as they were; the alerts on the
archive's freshness still see a stalled archive). A failed source keeps its exception (``cause``) for
a caller that must stop on it: ``health`` raises a catalog it could not read, as it always has.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.generations import Generations, boundaries, read_generations
from backup_tasks.catalog.manifest import Manifest, Verification
from backup_tasks.clock import parse_time, utcnow
from backup_tasks.errors import BackupError, ConfigError, StorageError
from backup_tasks.observe.continuity import WalSurvey, earliest_start, survey_wal
from backup_tasks.observe.verdict import SeriesVerdict, series_verdict
from backup_tasks.physical.ranges import SnapshotRange, newest_per_snapshot, restorable_ranges
from backup_tasks.postgres.archiver import ArchiverStats, ServerWal, read_server_wal
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal import state
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import segment_number
from backup_tasks.wal.remote import archive_for_reading

log = logging.getLogger(__name__)

#: The sources, as ``backup_tasks_source_up{source=...}`` names them.
CATALOG, WAL_ARCHIVE, WAL_STATE, SERVER = "catalog", "wal_archive", "wal_state", "server"
#: Not a source: a reading that failed for a reason nobody foresaw (a bug) is reported under this name.
INTERNAL = "internal"
#: Sources whose failure makes ``up`` 0 (the server's does not: see the module docstring).
OWN_SOURCES = (CATALOG, WAL_ARCHIVE, WAL_STATE, INTERNAL)
#: Read by ``status`` only (``list_copy``), never by a scrape: a top-level listing of BACKUP_COPY_TO.
COPY_SOURCE = "copy"


@dataclass(frozen=True)
class SourceStatus:
    name: str
    ok: bool
    error: str | None = None
    cause: BaseException | None = field(default=None, compare=False, repr=False)  # what failed, when ok is False


@dataclass(frozen=True)
class Series:
    """The complete backups of one database and kind: how many, the newest, and the verdict that speaks for them."""

    database: str
    kind: str  # "dump" or "snapshot"
    count: int
    verdict: SeriesVerdict  # the rule health judges by (``observe.verdict``), not the latest verification recorded

    @property
    def newest(self) -> Manifest:
        return self.verdict.newest

    @property
    def last_verification(self) -> Verification | None:
        """The verification the metrics report: the newest backup's, else the newest verdict before it."""
        return self.verdict.verification

    @property
    def last_verified_id(self) -> str | None:
        return None if self.verdict.judged is None else self.verdict.judged.id


@dataclass(frozen=True)
class RecoveryWindow:
    """On one timeline, the one unbroken span PITR can reach now that ends at the newest reachable moment."""

    database: str
    start: datetime
    end: datetime
    snapshot_id: str  # the snapshot a restore to ``start`` uses
    timeline: int = 1  # the recovery target timeline of the span
    system: str | None = None  # the generation (``catalog.generations``): its snapshots' system identifier
    replay: Replay | None = None  # what a restore to ``end`` replays, and the longest replay of the window


@dataclass(frozen=True)
class Replay:
    """The WAL a restore replays: from the start of the snapshot it starts from (an incremental's own start, its
    chain restored first) to the moment asked for. Counted in WAL segments of the archive."""

    snapshot_id: str  # the newest snapshot reaching the window's end: a restore to the end starts from it
    chain: tuple[str, ...]  # the snapshots that restore needs, root (a full) first
    from_segment: str  # its start
    to_segment: str  # the window's end
    segments: int  # replayed to reach the window's end
    max_segments: int  # the longest replay any moment of the window needs (just before the next snapshot)


@dataclass(frozen=True)
class ArchiveGap:
    """A missing segment with later ones archived: PITR from the snapshots before it stops at ``after``.

    A fact of the archive as the snapshots' coverage found it (not ``errors.WalGap``, the error wal-fetch
    raises for such a segment).
    """

    segment: str
    after: datetime


@dataclass(frozen=True)
class Drill:
    """The latest PITR drill of a database (``manifest.pitr_drill`` of its snapshots)."""

    database: str
    snapshot_id: str
    ok: bool
    drilled_at: datetime
    duration_seconds: float | None
    target_time: str | None
    problems: list[str]


@dataclass
class Facts:
    collected_at: datetime
    backup_dir: str
    copy_to: str | None
    sources: list[SourceStatus] = field(default_factory=list)
    manifests: list[Manifest] = field(default_factory=list)  # every readable manifest, any state, oldest first
    backups: list[Manifest] = field(default_factory=list)  # complete backups, oldest first
    series: list[Series] = field(default_factory=list)
    ranges: list[SnapshotRange] = field(default_factory=list)  # every snapshot on every timeline it restores onto
    #: Per database, the window on the newest timeline its snapshots restore onto (what a restore to the
    #: latest point follows): one per database, as the metrics label them.
    windows: list[RecoveryWindow] = field(default_factory=list)
    timeline_windows: list[RecoveryWindow] = field(default_factory=list)  # per database and timeline
    gaps: list[ArchiveGap] = field(default_factory=list)
    wal: dict[str, state.Newest] = field(default_factory=dict)  # "archive", "copy" -> newest acknowledged
    server: ServerWal | None = None  # None: not asked (no DATABASE_URL); its ``error`` when it did not answer
    drills: list[Drill] = field(default_factory=list)
    copy_missing: list[str] | None = None  # ids of backups BACKUP_COPY_TO lacks (``list_copy``), None: not read
    stored_sizes: dict[str, int | None] = field(default_factory=dict)  # for_health: id -> bytes (None: missing)
    continuity: WalSurvey | None = None  # for_health: the WAL from the earliest restorable snapshot on
    #: for_health, after a major upgrade: the same survey of each older generation, up to where the next begins
    older_continuity: list[WalSurvey] = field(default_factory=list)
    generations: Generations = field(default_factory=Generations)  # the catalog's and the archive's, merged
    continuity_is_newest: bool = True  # ``continuity`` is the newest generation's (the server's own WAL)
    duration_seconds: float = 0.0

    @property
    def archiver(self) -> ArchiverStats | None:
        """The server's ``pg_stat_archiver`` row; None when it was not asked or did not answer."""
        return None if self.server is None else self.server.archiver

    @property
    def up(self) -> bool:
        return all(s.ok for s in self.sources if s.name in OWN_SOURCES)

    def source(self, name: str) -> SourceStatus | None:
        return next((s for s in self.sources if s.name == name), None)

    def read_ok(self, name: str) -> bool:
        found = self.source(name)
        return found is not None and found.ok

    def problems(self) -> list[str]:
        return [f"{s.name}: {s.error}" for s in self.sources if not s.ok]


def collect(settings: Settings, *, storage: Storage | None = None, archive: WalArchive | None = None,
            now: datetime | None = None, read_server: bool = True, list_copy: bool = False,
            for_health: bool = False) -> Facts:
    """Read every source once; a source that fails is recorded as such and its facts left out.

    ``storage`` defaults to ``BACKUP_DIR`` alone (the catalog; the copy is not listed), ``archive`` to the
    local WAL archive of the settings (none when ``BACKUP_DIR`` is a URL and ``WAL_ARCHIVE_DIR`` unset).
    ``list_copy`` (``status``): also list the top of ``BACKUP_COPY_TO`` to find backups missing there.
    ``for_health`` (``health``): what a restore reads instead (``Settings.locations()``, the archive of
    ``wal.remote.archive_for_reading``), the newest dumps' stored sizes and the WAL ``continuity``.
    """
    started = time.monotonic()
    facts = Facts(collected_at=now or utcnow(), backup_dir=settings.backup_dir, copy_to=settings.copy_to)
    try:
        storage = _read_catalog(facts, settings, storage, for_health=for_health)
        if for_health and storage is not None:
            _read_stored_sizes(facts, storage)
        if archive is None:
            archive = _archive_for_health(facts, settings) if for_health else local_archive(settings)
        _read_generations(facts, storage, archive)
        _read_wal(facts, archive, storage, read_state=not for_health)
        if for_health and archive is not None:
            _survey(facts, archive, list_names=not settings.wal_archive_dir)
        if read_server and settings.database_url:
            facts.server = read_server_wal(settings.source())
            facts.sources.append(SourceStatus(SERVER, facts.server.error is None, facts.server.error))
        if list_copy and settings.copy_to:
            _read_copy(facts, settings.copy_to)
    except Exception as exc:  # a bug must show as a failed reading (up 0), never as a scrape serving nothing
        log.exception("reading the backup state failed")
        facts.sources.append(SourceStatus(INTERNAL, False, f"{type(exc).__name__}: {exc}", exc))
    facts.duration_seconds = time.monotonic() - started
    return facts


def _read_generations(facts: Facts, storage: Storage | None, archive: WalArchive | None) -> None:
    """The generations (``catalog.generations``); unreadable records are the catalog's failure (a source)."""
    try:
        available = archive is not None and archive.available()
        facts.generations = read_generations(storage, archive.primary if archive is not None and available else None,
                                             facts.manifests)
    except (BackupError, OSError) as exc:
        facts.sources.append(SourceStatus(CATALOG, False, _reason(exc, facts.backup_dir), exc))


def _survey(facts: Facts, archive: WalArchive, *, list_names: bool) -> None:
    """The WAL continuity of each generation, from its earliest restorable snapshot to where the next one begins.

    The newest generation's (the one with snapshots: a new server with none yet has nothing to replay
    its WAL onto, which health says) is ``continuity``; older ones' ``older_continuity``.
    """
    snapshots = [m for m in facts.manifests if m.kind == "snapshot"]
    coverage_of = {r.snapshot.id: r.coverage for r in newest_per_snapshot(facts.ranges)}
    systems = [g.system for g in facts.generations.generations] or [None]
    surveys: list[WalSurvey] = []
    for system in systems:
        own = [m for m in snapshots if len(systems) == 1 or m.system_identifier == system]
        earliest = earliest_start(own)
        if earliest is None and len(systems) > 1:
            continue
        known = coverage_of.get(earliest.id) if earliest else None
        surveys.append(survey_wal(archive, earliest, known=known, list_names=list_names and not snapshots,
                                  bounds=boundaries(facts.generations)))
    if not surveys:  # generations, none with a restorable snapshot
        surveys.append(survey_wal(archive, None, list_names=list_names and not snapshots))
    facts.continuity, facts.older_continuity = surveys[-1], surveys[:-1]
    newest = facts.generations.newest
    facts.continuity_is_newest = newest is None or len(systems) == 1 or \
        any(m.system_identifier == newest.system for m in snapshots if m.restorable)


def local_archive(settings: Settings) -> WalArchive | None:
    """The local WAL archive wal-push writes (and its state file); None when there is none to read."""
    try:
        # Our own state: a scrape never lists the copy.
        return WalArchive.for_settings(settings, read_copy=False)
    except ConfigError:  # BACKUP_DIR is a URL and WAL_ARCHIVE_DIR unset: no local archive on this host
        return None


def _archive_for_health(facts: Facts, settings: Settings) -> WalArchive | None:
    """The archive a restore reads (the bucket's ``wal/`` when BACKUP_DIR is one); None, recorded, if it cannot be."""
    try:
        return archive_for_reading(settings, copy_on_gap=True)  # the copy listed only to fill a hole
    except BackupError as exc:
        facts.sources.append(SourceStatus(WAL_ARCHIVE, False, str(exc), exc))
        facts.continuity = WalSurvey(archive=str(settings.wal_archive_dir or settings.backup_dir), error=str(exc))
        return None


# --- the catalog ------------------------------------------------------------------------------------

def _read_catalog(facts: Facts, settings: Settings, storage: Storage | None, *,
                  for_health: bool) -> Storage | None:
    """The catalog's facts; returns the storage read (None when it could not be)."""
    try:
        if storage is None and for_health:
            storage = settings.locations()  # BACKUP_DIR, mirrored to BACKUP_COPY_TO when that is set
        elif storage is None:
            if "://" not in settings.backup_dir and not Path(settings.backup_dir).is_dir():
                # Listing a missing directory finds nothing: an unmounted volume must not look like "no backups".
                facts.sources.append(SourceStatus(CATALOG, False, f"BACKUP_DIR {settings.backup_dir} does not "
                                                                  f"exist or is not a directory"))
                return None
            storage = open_storage(settings.backup_dir)
        manifests = catalog.catalog(storage)
    except (BackupError, OSError) as exc:  # OSError: a path this user may not even look at
        facts.sources.append(SourceStatus(CATALOG, False, _reason(exc, settings.backup_dir), exc))
        return None
    facts.sources.append(SourceStatus(CATALOG, True))
    facts.manifests = manifests
    facts.backups = [m for m in manifests if m.state == "complete"]
    facts.series = series_of(facts.backups)
    facts.drills = latest_drills(facts.backups)
    return storage


def _read_stored_sizes(facts: Facts, storage: Storage) -> None:
    """The size as stored of each database's newest dump (any state): an empty or missing file is a problem."""
    newest = {m.database: m for m in facts.manifests if m.kind == "dump"}  # oldest first: the last one wins
    for m in newest.values():
        try:
            facts.stored_sizes[m.id] = storage.size(m.path)
        except StorageError:
            facts.stored_sizes[m.id] = None


def series_of(backups: list[Manifest]) -> list[Series]:
    """One ``Series`` per (database, kind) of ``backups`` (complete, oldest first)."""
    groups: dict[tuple[str, str], list[Manifest]] = defaultdict(list)
    for m in backups:
        groups[(m.database, m.kind)].append(m)
    return [Series(database, kind, len(group), series_verdict(group))
            for (database, kind), group in sorted(groups.items())]


def latest_drills(backups: list[Manifest]) -> list[Drill]:
    """The latest recorded PITR drill per database."""
    latest: dict[str, Drill] = {}
    for m in backups:
        drill = _drill_of(m)
        if drill is not None and (drill.database not in latest or drill.drilled_at > latest[drill.database].drilled_at):
            latest[drill.database] = drill
    return [latest[database] for database in sorted(latest)]


def _drill_of(m: Manifest) -> Drill | None:
    record: dict[str, Any] | None = m.pitr_drill
    if not record or not record.get("drilled_at"):
        return None
    try:
        drilled_at = parse_time(str(record["drilled_at"]))
    except ValueError:
        return None
    duration = record.get("duration_seconds")
    return Drill(database=m.database, snapshot_id=m.id, ok=bool(record.get("ok")), drilled_at=drilled_at,
                 duration_seconds=float(duration) if isinstance(duration, (int, float)) else None,
                 target_time=record.get("target_time"), problems=list(record.get("problems") or []))


def _read_copy(facts: Facts, copy_to: str) -> None:
    if not facts.read_ok(CATALOG):
        return
    try:
        held = {obj.key for obj in open_storage(copy_to, setting="BACKUP_COPY_TO").list(recursive=False)}
    except BackupError as exc:
        facts.sources.append(SourceStatus(COPY_SOURCE, False, str(exc)))
        return
    facts.sources.append(SourceStatus(COPY_SOURCE, True))
    facts.copy_missing = [m.id for m in facts.backups if m.path not in held or m.key not in held]


# --- the WAL archive: its state file and what the snapshots can reach ---------------------------------

def _reason(exc: BackupError | OSError, where: str) -> str:
    if isinstance(exc, OSError):
        return f"cannot read {exc.filename or where}: {exc.strerror or exc}"
    return str(exc)


def _read_wal(facts: Facts, archive: WalArchive | None, storage: Storage | None, *, read_state: bool) -> None:
    snapshots = [m for m in facts.backups if m.kind == "snapshot"]
    try:
        available = archive is not None and archive.available()
    except (BackupError, OSError) as exc:
        where = archive.location if archive else ""
        facts.sources.append(SourceStatus(WAL_ARCHIVE, False, _reason(exc, where), exc))
        return
    if archive is None or not available:
        if snapshots and archive is not None:
            # Snapshots without their archive restore to nothing later than their end: say so, do not guess.
            facts.sources.append(SourceStatus(WAL_ARCHIVE, False, f"the WAL archive {archive.location} does not "
                                                                  f"exist or cannot be entered"))
        return
    if read_state:  # the exporter's word on the archive's freshness; a health check reads the archive itself
        try:
            facts.wal = state.read(archive.root)
            facts.sources.append(SourceStatus(WAL_STATE, True))
        except state.StateUnreadable as exc:
            facts.sources.append(SourceStatus(WAL_STATE, False, str(exc), exc))
    if not snapshots or storage is None:  # snapshots are known only from a catalog that was read
        return
    try:
        facts.ranges = restorable_ranges(storage, archive, snapshots)
    except (BackupError, OSError) as exc:
        facts.sources.append(SourceStatus(WAL_ARCHIVE, False, _reason(exc, archive.location), exc))
        return
    facts.sources.append(SourceStatus(WAL_ARCHIVE, True))
    facts.timeline_windows = recovery_windows(facts.ranges)
    facts.windows = newest_windows(facts.timeline_windows)
    facts.gaps = archive_gaps(facts.ranges)


def recovery_windows(ranges: list[SnapshotRange]) -> list[RecoveryWindow]:
    """Per database and timeline, the unbroken span of restorable moments that ends at the newest one.

    Each snapshot reaches from its consistency point to the end of the WAL run unbroken from its start
    along the timeline's path; overlapping or touching spans join. A WAL gap splits them: the window then
    starts at the first snapshot after the gap, since no moment between the gap and that snapshot can be
    reached. Spans of different timelines never join: the same moment on two branches is two states.
    """
    groups: dict[tuple[str, str, int], list[SnapshotRange]] = defaultdict(list)
    for r in ranges:
        groups[(r.snapshot.database, r.snapshot.system_identifier or "", r.timeline)].append(r)
    first_of: dict[str, datetime] = {}  # each generation's earliest moment: generations in time order
    for (_database, system, _timeline), group in groups.items():
        first_of[system] = min([first_of.get(system, group[0].restorable_from), *(r.restorable_from for r in group)])
    windows = []
    # Generations never join either: the old system's last moment and the new one's first are two servers.
    for (database, system, timeline), group in sorted(groups.items(), key=lambda item: (
            item[0][0], first_of[item[0][1]], item[0][2])):
        group = sorted(group, key=lambda r: r.restorable_from)
        start, end, snapshot_id = group[0].restorable_from, group[0].restorable_until, group[0].snapshot.id
        first = 0
        for index, r in enumerate(group[1:], start=1):
            if r.restorable_from > end:  # a hole: the window starts again here
                start, snapshot_id, first = r.restorable_from, r.snapshot.id, index
            end = max(end, r.restorable_until)
        windows.append(RecoveryWindow(database, start, end, snapshot_id, timeline, system or None,
                                      window_replay(group[first:], end)))
    return windows


def window_replay(ranges: list[SnapshotRange], end: datetime) -> Replay | None:
    """The replay of a window made of ``ranges`` (by ``restorable_from``): a moment is restored from the newest
    snapshot consistent before it, so the longest replay is just before the next snapshot, or to the end."""
    reaching = [r for r in ranges if r.restorable_until >= end]
    if not reaching or not reaching[-1].coverage.end_segment:
        return None
    newest = reaching[-1]
    longest = newest.coverage.segments
    for r, following in itertools.pairwise(ranges):
        size = int(r.snapshot.wal_segment_size or 0)
        if size and r.snapshot.start_segment and following.snapshot.stop_segment:
            longest = max(longest, segment_number(following.snapshot.stop_segment, size)
                          - segment_number(r.snapshot.start_segment, size) + 1)
    return Replay(newest.snapshot.id, tuple(newest.snapshot.chain_ids), newest.coverage.start_segment,
                  newest.coverage.end_segment, newest.coverage.segments, longest)


def newest_windows(windows: list[RecoveryWindow]) -> list[RecoveryWindow]:
    """Per database, the window on the newest timeline of the newest generation (``windows``: by database, then
    generation in time order, then ascending timeline)."""
    return list({w.database: w for w in windows}.values())


def archive_gaps(ranges: list[SnapshotRange]) -> list[ArchiveGap]:
    """Each distinct WAL gap the snapshots' coverage ran into, oldest first."""
    found = {r.coverage.gap: r.restorable_until for r in ranges if r.coverage.gap}
    return sorted((ArchiveGap(segment, after) for segment, after in found.items()), key=lambda g: g.after)

