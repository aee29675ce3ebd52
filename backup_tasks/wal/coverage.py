"""What the WAL archive can restore: timeline paths, the unbroken run of segments from a start, gaps.

Recovery from a base backup replays every segment from the backup's start onwards, on the timeline
PostgreSQL would choose (``recovery_target_timeline = 'latest'``). A missing segment with later ones
present is a *gap*, reported rather than silently treated as the end.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from backup_tasks.errors import WalArchiveError
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.index import TimelineRuns, timeline_runs_of_names
from backup_tasks.wal.names import parse_lsn, segment_name, segment_number, segments_per_xlogid, timeline_of


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


def coverage(archive: WalArchive, start_segment: str, segment_size: int,
             names: list[str] | None = None) -> Coverage:
    return coverages(archive, [(start_segment, segment_size)], names)[0]


def coverages(archive: WalArchive, starts: list[tuple[str, int]], names: list[str] | None = None) -> list[Coverage]:
    """``coverage`` of each ``(start_segment, segment_size)``: from ``names`` (segment names), else the archive's.

    ``list`` asks this for every snapshot of twelve weeks (100,000+ segments). The archive is read as
    runs of consecutive segments (``wal.index``: a local archive's cached per-directory summaries),
    and each start walks runs, not names: a run is crossed in one step, so the cost is the number of
    runs and of timeline switches, not of segments.
    """
    runs = timeline_runs_of_names(names) if names is not None else archive.segment_runs()
    #: (start timeline, segment size) -> timeline path, the archive as segment-number intervals per
    #: followed timeline, and the newest archived segment on the path (name and number).
    paths: dict[tuple[int, int], tuple[list[TimelineStep], dict[int, list[tuple[int, int]]], str | None, int]] = {}
    found = []
    for start_segment, segment_size in starts:
        key = (timeline_of(start_segment), segment_size)
        if key not in paths:
            steps = timeline_path(archive, key[0], segment_size)
            intervals = {step.timeline: _intervals(runs.get(step.timeline, []), segment_size) for step in steps}
            paths[key] = (steps, intervals, *_newest(runs, intervals, segment_size))
        steps, intervals, last_archived, last_segno = paths[key]
        end, count, gap = _walk(steps, intervals, segment_number(start_segment, segment_size), last_segno,
                                segment_size)
        completed = archive.trailer(end).completed_at if end else None
        found.append(Coverage(start_segment=start_segment, end_segment=end, end_completed_at=completed,
                              segments=count, gap=gap, last_archived=last_archived,
                              timelines=[s.timeline for s in steps]))
    return found


def _intervals(runs: list[tuple[int, int, int]], segment_size: int) -> list[tuple[int, int]]:
    """A timeline's runs as merged, sorted intervals of segment numbers (``wal.names.segment_number``).

    A name whose ``name[16:24]`` is past the last segment of a log id at this size (never written by
    PostgreSQL) is left out: no segment name of this size can match it.
    """
    per = segments_per_xlogid(segment_size)
    intervals: list[tuple[int, int]] = []
    for log_id, first, last in runs:
        if first >= per:
            continue
        low, high = log_id * per + first, log_id * per + min(last, per - 1)
        if intervals and low <= intervals[-1][1] + 1:
            intervals[-1] = (intervals[-1][0], max(high, intervals[-1][1]))
        else:
            intervals.append((low, high))
    return intervals


def _newest(runs: TimelineRuns, intervals: dict[int, list[tuple[int, int]]],
            segment_size: int) -> tuple[str | None, int]:
    """The newest archived segment on the followed timelines (the lower timeline on a tie), and its number."""
    best: tuple[int, int, int, int] | None = None  # (log id, seg, -timeline, timeline)
    for timeline in intervals:
        if runs.get(timeline):
            log_id, _first, last = max(runs[timeline], key=lambda run: (run[0], run[2]))
            candidate = (log_id, last, -timeline, timeline)
            best = candidate if best is None or candidate > best else best
    if best is None:
        return None, -1
    log_id, seg, _, timeline = best
    return f"{timeline:08X}{log_id:08X}{seg:08X}", log_id * segments_per_xlogid(segment_size) + seg


def _walk(steps: list[TimelineStep], intervals: dict[int, list[tuple[int, int]]], first: int, last_segno: int,
          segment_size: int) -> tuple[str | None, int, str | None]:
    """From segment number ``first``: the end of the unbroken run, its length, and the gap after it."""
    segno, count = first, 0
    end: str | None = None
    while True:
        timeline = timeline_for(steps, segno)
        switch = min((s.first_segno for s in steps if s.first_segno > segno), default=None)
        spans = intervals[timeline]
        at = bisect_right(spans, (segno, _FAR)) - 1
        if at < 0 or spans[at][1] < segno:
            gap = segment_name(timeline, segno, segment_size) if segno <= last_segno else None
            return end, count, gap
        stop = spans[at][1] if switch is None else min(spans[at][1], switch - 1)
        count += stop - segno + 1
        end = segment_name(timeline, stop, segment_size)
        segno = stop + 1


#: Larger than any segment number: ``(n, _FAR)`` sorts after every interval starting at ``n``.
_FAR = 1 << 64
