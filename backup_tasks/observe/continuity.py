"""WAL continuity as health judges it: the holes from the earliest restorable snapshot to the newest segment.

``survey_wal`` reads what ``health.assess_wal`` needs, the way WAL-G's ``wal-verify`` looks: the path
of timelines recovery follows from that snapshot's start segment (to the newest timeline whose history
holds the snapshot: ``wal.timelines``; another branch's segments are not holes), the unbroken run from there
(``wal.coverage``, the coverage the recovery window was computed from when ``facts`` has it), every
missing run below the newest archived segment, and when the segment after each hole was completed
(its trailer: the clock tells a hole still being archived from a lost one). It is part of the facts
a health check gathers (``facts.collect(for_health=True)``), never of a scrape.

What it costs: a healthy archive costs what ``coverages`` costs (the archive's index, not a walk of
every name); the archive's names are read only when there is a gap to describe, or to tell whether
WAL is archived at all when nothing else says point-in-time recovery is configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import BackupError
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import Coverage, TimelineStep, coverages, timeline_for, timeline_path
from backup_tasks.wal.names import position, segment_name, segment_number, timeline_of

#: Holes whose following segment's trailer is read for its completion time, newest first.
TRAILERS_READ = 50


@dataclass(frozen=True)
class Hole:
    """Missing segments (numbers) below the newest archived one, and when the segment after them was completed."""

    first_segno: int
    last_segno: int
    next_completed_at: float | None  # unix time; None: not read or unreadable


@dataclass
class WalSurvey:
    """The archive as ``health.assess_wal`` judges it, from the earliest restorable snapshot's start."""

    archive: str
    available: bool = True
    error: str | None = None  # the archive could not be opened or read
    holds_segments: bool = False  # listed only when nothing else says PITR is configured (``list_names``)
    start_segment: str | None = None
    segment_size: int = 16 << 20
    steps: list[TimelineStep] = field(default_factory=list)
    last_archived: str | None = None
    unbroken_to: str | None = None
    holes: list[Hole] = field(default_factory=list)
    newest_timeline: int | None = None


def earliest_start(snapshots: list[Manifest]) -> Manifest | None:
    """The restorable snapshot whose WAL starts first: continuity is checked from there (as prune keeps WAL)."""
    candidates = [m for m in snapshots if m.restorable]
    return min(candidates, key=lambda m: position(str(m.start_segment))) if candidates else None


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


def survey_wal(archive: WalArchive, earliest: Manifest | None, *, list_names: bool,
               known: Coverage | None = None, bounds: Sequence[str] = ()) -> WalSurvey:
    """Read what ``assess_wal`` needs: the path from ``earliest``'s start segment, the holes, the newest timeline.

    ``list_names``: list the archive's segments to tell whether it holds any (and on which timelines).
    ``known``: ``earliest``'s coverage when it was read already (the recovery window's), else it is read here.
    ``bounds``: where later generations' WAL begins (``catalog.generations.boundaries``): the survey of
    an older generation ends there.
    """
    survey = WalSurvey(archive=archive.location)
    try:
        survey.available = archive.available()
        if not survey.available:
            return survey
        names = archive.segment_names() if list_names else None
        survey.holds_segments = bool(names)
        # The archive's newest timeline: every timeline after the first has a history file, archived first.
        timelines = [int(h[:8], 16) for h in archive.history_names()] + [timeline_of(n) for n in names or []]
        if earliest is not None:
            start, size = str(earliest.start_segment), int(earliest.wal_segment_size or 0)
            survey.start_segment, survey.segment_size = start, size
            cover = known or coverages(archive, [(start, size)], names, bounds=bounds)[0]
            survey.steps = timeline_path(archive, timeline_of(start), size, start_segno=segment_number(start, size),
                                         target=cover.timeline)
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
