"""What the WAL archive can restore: timeline paths, the unbroken run of segments from a start, gaps.

Recovery from a base backup replays every segment from the backup's start onwards, on the path of one
recovery target timeline (``wal.timelines``: the history files' tree). A start is a segment and a size,
and the timeline recovery targets when known (planning knows it: the snapshot's end position decides
which timelines it can reach); without one, the newest timeline whose path reads the start segment from
the start's own timeline (the fork point checked at segment granularity). A missing segment with later
ones present *on the same path* is a *gap*, reported rather than silently treated as the end; segments
of another branch (the old timeline going on after a fork) are neither the path's end nor its gaps.

Generations (``catalog.generations``): after a major upgrade the new system's WAL goes on in the same
archive, from its first segment on (``pg_upgrade`` continues the old positions, leaving a few names
unused). A start's coverage ends at the next generation's first segment (``bounds``): the old system's
last segment is its end, the names skipped before the new one's first are no gap, and the new system's
segments are not the old one's to replay.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.index import TimelineRuns, timeline_runs_of_names
from backup_tasks.wal.names import segment_name, segment_number, segments_per_xlogid, timeline_of
from backup_tasks.wal.timelines import TimelineStep, TimelineTree, parse_history, timeline_for

__all__ = ["Coverage", "TimelineStep", "coverage", "coverages", "parse_history", "timeline_for", "timeline_path"]

#: ``(start segment, segment size)``, or with the recovery target timeline: ``(start segment, size, timeline)``.
Start = tuple[str, int] | tuple[str, int, int]


def timeline_path(archive: WalArchive, start_timeline: int, segment_size: int, *, start_segno: int | None = None,
                  target: int | None = None, tree: TimelineTree | None = None) -> list[TimelineStep]:
    """The timelines recovery from ``start_timeline`` follows, from the start on.

    ``target``: the recovery target timeline; else the newest one whose path reads ``start_segno`` from
    ``start_timeline`` (without ``start_segno``: the newest descending from it, the fork point unchecked).
    """
    tree = tree or TimelineTree.read(archive)
    if target is None:
        target = (tree.newest_through(start_timeline, start_segno, segment_size) if start_segno is not None else
                  max((t for t in tree.known if t == start_timeline or tree.fork_point(t, start_timeline) is not None),
                      default=start_timeline))
    if start_segno is not None:
        return tree.steps(target, segment_size, start_segno)
    path = tree.steps(target, segment_size)
    at = next((i for i, step in enumerate(path) if step.timeline == start_timeline), 0)
    return [TimelineStep(path[at].timeline, 0), *path[at + 1:]]


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


    @property
    def timeline(self) -> int:
        """The recovery target timeline this coverage was walked for (the last one followed)."""
        return self.timelines[-1]


def coverage(archive: WalArchive, start_segment: str, segment_size: int,
             names: list[str] | None = None, *, bounds: Sequence[str] = ()) -> Coverage:
    return coverages(archive, [(start_segment, segment_size)], names, bounds=bounds)[0]


def limit_for(start_segment: str, segment_size: int, bounds: Sequence[str]) -> int:
    """The first segment number past ``start_segment``'s generation: the next generation's first segment among
    ``bounds`` (``catalog.generations.boundaries``), else none (``_FAR``)."""
    first = segment_number(start_segment, segment_size)
    return min((n for n in (segment_number(b, segment_size) for b in bounds) if n > first), default=_FAR)


def coverages(archive: WalArchive, starts: Sequence[Start], names: list[str] | None = None, *,
              tree: TimelineTree | None = None, runs: TimelineRuns | None = None,
              bounds: Sequence[str] = ()) -> list[Coverage]:
    """``coverage`` of each start (``Start``): from ``names`` (segment names), else the archive's.

    ``list`` asks this for every snapshot of twelve weeks (100,000+ segments). The archive is read as
    runs of consecutive segments (``wal.index``: a local archive's cached per-directory summaries),
    and each start walks runs, not names: a run is crossed in one step, so the cost is the number of
    runs and of timeline switches, not of segments. The history files are read once; ``tree`` and
    ``runs`` (``archive.segment_runs()``): the caller's when it read them already. ``bounds``: the first
    segments of later generations (see the module docstring).
    """
    if runs is None:
        runs = timeline_runs_of_names(names) if names is not None else archive.segment_runs()
    tree = tree or TimelineTree.read(archive, runs)
    intervals: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (timeline, size) -> segment-number intervals
    found = []
    for start in starts:
        start_segment, segment_size, *target = start
        first = segment_number(start_segment, segment_size)
        steps = timeline_path(archive, timeline_of(start_segment), segment_size, start_segno=first,
                              target=target[0] if target else None, tree=tree)
        on_path = {}
        for step in steps:
            key = (step.timeline, segment_size)
            if key not in intervals:
                intervals[key] = _intervals(runs.get(step.timeline, []), segment_size)
            on_path[step.timeline] = intervals[key]
        limit = limit_for(start_segment, segment_size, bounds)
        last_archived, last_segno = _newest(steps, on_path, segment_size, limit)
        end, count, gap = _walk(steps, on_path, first, last_segno, segment_size, limit)
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


def _newest(steps: list[TimelineStep], intervals: dict[int, list[tuple[int, int]]],
            segment_size: int, limit: int) -> tuple[str | None, int]:
    """The newest archived segment the path reads (each step's timeline before the next step), and its number.

    A segment of a timeline past the point where the path leaves it (the old timeline going on after a
    fork) is another branch's: it makes no gap on this path.
    """
    best = -1
    for index, step in enumerate(steps):
        below = min(steps[index + 1].first_segno if index + 1 < len(steps) else _FAR, limit)
        spans = intervals[step.timeline]
        at = bisect_right(spans, (below - 1, _FAR)) - 1
        if at >= 0 and spans[at][1] >= step.first_segno:
            best = max(best, min(spans[at][1], below - 1))
    if best < 0:
        return None, -1
    return segment_name(timeline_for(steps, best), best, segment_size), best


def _walk(steps: list[TimelineStep], intervals: dict[int, list[tuple[int, int]]], first: int, last_segno: int,
          segment_size: int, limit: int = 1 << 64) -> tuple[str | None, int, str | None]:
    """From segment number ``first``: the end of the unbroken run, its length, and the gap after it (never at or past
    ``limit``, where the next generation begins)."""
    segno, count = first, 0
    end: str | None = None
    while True:
        if segno >= limit:
            return end, count, None
        timeline = timeline_for(steps, segno)
        switch = min((s.first_segno for s in steps if s.first_segno > segno), default=None)
        spans = intervals[timeline]
        at = bisect_right(spans, (segno, _FAR)) - 1
        if at < 0 or spans[at][1] < segno:
            gap = segment_name(timeline, segno, segment_size) if segno <= last_segno else None
            return end, count, gap
        stop = min(spans[at][1] if switch is None else min(spans[at][1], switch - 1), limit - 1)
        count += stop - segno + 1
        end = segment_name(timeline, stop, segment_size)
        segno = stop + 1


#: Larger than any segment number: ``(n, _FAR)`` sorts after every interval starting at ``n``.
_FAR = 1 << 64
