"""What the WAL archive can restore: timeline paths, contiguous coverage, gaps, restore points.

Recovery from a base backup replays every segment from the backup's start onwards, on the timeline
PostgreSQL would choose (``recovery_target_timeline = 'latest'``: the newest timeline whose history
contains the backup's). The archive covers a backup up to the last segment of an unbroken run from
its start; a missing segment with later ones present is a *gap*, reported rather than silently
treated as the end.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .errors import WalArchiveError
from .wal import (
    FILE_MODE,
    RESTORE_POINT_DIR,
    WalArchive,
    parse_lsn,
    position,
    segment_name,
    segment_number,
    timeline_of,
)


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
    names = archive.segment_names() if names is None else names
    present = set(names)
    steps = timeline_path(archive, timeline_of(start_segment), segment_size)
    followed = {step.timeline for step in steps}
    on_path = [n for n in names if timeline_of(n) in followed]
    last_archived = max(on_path, key=position) if on_path else None
    last_segno = segment_number(last_archived, segment_size) if last_archived else -1
    segno = segment_number(start_segment, segment_size)
    end: str | None = None
    count = 0
    gap: str | None = None
    while True:
        name = segment_name(timeline_for(steps, segno), segno, segment_size)
        if name not in present:
            if segno <= last_segno:
                gap = name
            break
        end = name
        count += 1
        segno += 1
    completed = archive.trailer(end).completed_at if end else None
    return Coverage(start_segment=start_segment, end_segment=end, end_completed_at=completed, segments=count,
                    gap=gap, last_archived=last_archived, timelines=[s.timeline for s in steps])


# --- restore points ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestorePoint:
    name: str
    lsn: str
    timeline: int
    segment: str
    created_at: str  # ISO 8601 with microseconds, UTC
    system_identifier: str | None = None
    trading_day: str | None = None

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "_"


def restore_point_key(point: RestorePoint) -> str:
    return f"{RESTORE_POINT_DIR}/{point.segment}-{_safe(point.name)}.json"


def save_restore_point(archive: WalArchive, point: RestorePoint) -> Path:
    """Record a restore point in the archive (mode 0640, like the WAL it refers to)."""
    path = archive.root / restore_point_key(point)
    archive._ensure_subdir(path.parent)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(point), out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    return path


def restore_points(archive: WalArchive) -> list[RestorePoint]:
    """Every recorded restore point, oldest first."""
    directory = archive.root / RESTORE_POINT_DIR
    found = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        try:
            data = json.loads((directory / entry).read_text())
            found.append(RestorePoint(**{k: data.get(k) for k in RestorePoint.__dataclass_fields__}))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(found, key=lambda p: (position(p.segment), p.created_at))


def delete_restore_point(archive: WalArchive, point: RestorePoint) -> None:
    try:
        (archive.root / restore_point_key(point)).unlink()
    except FileNotFoundError:
        pass
