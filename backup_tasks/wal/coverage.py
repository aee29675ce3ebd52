"""What the WAL archive can restore: timeline paths, the unbroken run of segments from a start, gaps.

Recovery from a base backup replays every segment from the backup's start onwards, on the timeline
PostgreSQL would choose (``recovery_target_timeline = 'latest'``). A missing segment with later ones
present is a *gap*, reported rather than silently treated as the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from backup_tasks.errors import WalArchiveError
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import parse_lsn, position, segment_name, segment_number, timeline_of


@dataclass(frozen=True)
class TimelineStep:
    timeline: int
    first_segno: int  # the first segment number read from this timeline


def parse_history(text: str) -> list[tuple[int, int]]:
    """``(parent timeline, switch LSN)`` pairs of a timeline history file, oldest first."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            entries.append((int(parts[0]), parse_lsn(parts[1])))
    return entries


def timeline_path(archive: WalArchive, start_timeline: int, segment_size: int) -> list[TimelineStep]:
    """The timelines recovery from ``start_timeline`` follows to the newest one descending from it."""
    best, best_entries = start_timeline, []
    for history in archive.history_names():
        timeline = int(history[:8], 16)
        if timeline <= best:
            continue
        try:
            entries = parse_history(archive.read_text(history))
        except WalArchiveError:
            continue
        if start_timeline in {parent for parent, _lsn in entries}:
            best, best_entries = timeline, entries
    steps = [TimelineStep(start_timeline, 0)]
    following = False
    for index, (parent, switch_lsn) in enumerate(best_entries):
        following = following or parent == start_timeline
        if following:
            child = best_entries[index + 1][0] if index + 1 < len(best_entries) else best
            steps.append(TimelineStep(child, switch_lsn // segment_size))
    return steps


def timeline_for(steps: list[TimelineStep], segno: int) -> int:
    chosen = steps[0].timeline
    for step in steps:
        if step.first_segno <= segno:
            chosen = step.timeline
    return chosen


@dataclass
class Coverage:
    """The unbroken run of archived segments from ``start_segment``."""

    start_segment: str
    end_segment: str | None  # the last segment of the unbroken run (None: not even the first is archived)
    end_completed_at: float | None  # when the server finished writing end_segment (unix time)
    segments: int
    gap: str | None  # first missing segment while later ones are archived
    last_archived: str | None  # the newest segment in the archive on the followed timelines
    timelines: list[int] = field(default_factory=list)

    @property
    def covered_until(self) -> datetime | None:
        if self.end_completed_at is None:
            return None
        return datetime.fromtimestamp(self.end_completed_at, UTC)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        until = self.covered_until
        data["covered_until"] = until.isoformat() if until else None
        return data


#: A walked run: its end segment, its length in segments, and the gap after it.
_Run = tuple[str | None, int, str | None]


def coverage(archive: WalArchive, start_segment: str, segment_size: int,
             names: list[str] | None = None) -> Coverage:
    return coverages(archive, [(start_segment, segment_size)], names)[0]


def coverages(archive: WalArchive, starts: list[tuple[str, int]], names: list[str] | None = None) -> list[Coverage]:
    """``coverage`` of each ``(start_segment, segment_size)``, in one pass over the archive's names.

    ``list`` asks this for every snapshot of twelve weeks (100,000+ segments): the names are indexed
    once per timeline path, and the run of a later start is reused by every earlier start that
    reaches it (the walk from a segment on does not depend on where it began), so the cost is the
    archive's size once, not once per snapshot.
    """
    names = archive.segment_names() if names is None else names
    present = set(names)
    #: (start timeline, segment size) -> timeline path, last archived segment on it, its number, and
    #: the runs already walked: segment number -> (end segment, segments from there, gap)
    paths: dict[tuple[int, int], tuple[list[TimelineStep], str | None, int, dict[int, _Run]]] = {}
    found: dict[int, Coverage] = {}
    # Latest start first, so an earlier start's walk stops where a later one's run is known.
    for index in sorted(range(len(starts)), key=lambda i: position(starts[i][0]), reverse=True):
        start_segment, segment_size = starts[index]
        key = (timeline_of(start_segment), segment_size)
        if key not in paths:
            steps = timeline_path(archive, key[0], segment_size)
            followed = {step.timeline for step in steps}
            on_path = [n for n in names if timeline_of(n) in followed]
            last = max(on_path, key=position) if on_path else None
            paths[key] = (steps, last, segment_number(last, segment_size) if last else -1, {})
        steps, last_archived, last_segno, runs = paths[key]
        first = segno = segment_number(start_segment, segment_size)
        end: str | None = None
        count = 0
        gap: str | None = None
        while True:
            if segno in runs:
                known_end, known_count, gap = runs[segno]
                end, count = known_end or end, count + known_count
                break
            name = segment_name(timeline_for(steps, segno), segno, segment_size)
            if name not in present:
                if segno <= last_segno:
                    gap = name
                break
            end = name
            count += 1
            segno += 1
        runs[first] = (end, count, gap)
        completed = archive.trailer(end).completed_at if end else None
        found[index] = Coverage(start_segment=start_segment, end_segment=end, end_completed_at=completed,
                                segments=count, gap=gap, last_archived=last_archived,
                                timelines=[s.timeline for s in steps])
    return [found[i] for i in range(len(starts))]
