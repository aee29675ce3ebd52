"""Timelines as a tree: each timeline's ancestry from its history file, and the path recovery follows.

A server promoted at the end of a recovery starts a new timeline and archives ``<TLI>.history``: one
line per ancestor, oldest first, ``parent-TLI  switch-LSN  reason``, where the switch LSN is where that
ancestor stops being part of the new timeline's history (its child begins there). So the history file of
a timeline names its whole ancestry; timeline 1, and a timeline whose history file is missing, have none.

A position ``(timeline, LSN)`` belongs to timeline ``T``'s history when it is on ``T`` itself, or on an
ancestor of ``T`` before the point where ``T``'s history forks off that ancestor. This is the test
PostgreSQL applies when recovery starts ("requested timeline is not a child of this server's history"),
so a snapshot (its end position: the state it is consistent at) restores onto ``T`` exactly when it
passes it. Everything that reasons about timelines (coverage, planning, recovery settings, health)
asks this one tree.

The path recovery to ``T`` reads: for each segment number, the file of the newest timeline on ``T``'s
history that began at or before that segment (as PostgreSQL's ``XLogFileReadAnyTLI`` tries it first).
Its steps are ``TimelineStep(timeline, first_segno)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from backup_tasks.errors import WalArchiveError
from backup_tasks.wal.names import HISTORY_RE, parse_lsn


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


def timeline_for(steps: list[TimelineStep], segno: int) -> int:
    """The timeline whose file a path reads for segment number ``segno``."""
    chosen = steps[0].timeline
    for step in steps:
        if step.first_segno <= segno:
            chosen = step.timeline
    return chosen


class ArchiveHistories(Protocol):
    """What the tree reads of an archive: its history file names and their text (``wal.archive.WalArchive``)."""

    def history_names(self) -> list[str]: ...

    def read_text(self, name: str) -> str: ...


@dataclass(frozen=True)
class TimelineTree:
    """Every known timeline and its ancestry (``(ancestor, switch LSN)``, oldest first)."""

    ancestry: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    known: frozenset[int] = frozenset()  # timelines with a history file or archived segments
    unreadable: tuple[str, ...] = ()  # history files that could not be read (their timelines have no ancestry)

    @classmethod
    def read(cls, archive: ArchiveHistories, segment_timelines: Iterable[int] = ()) -> TimelineTree:
        """The tree of ``archive``'s history files; ``segment_timelines``: timelines known from archived segments."""
        ancestry: dict[int, tuple[tuple[int, int], ...]] = {}
        unreadable = []
        for name in archive.history_names():
            if not HISTORY_RE.match(name):
                continue
            try:
                ancestry[int(name[:8], 16)] = tuple(parse_history(archive.read_text(name)))
            except WalArchiveError:
                unreadable.append(name)
        return cls(ancestry, frozenset(ancestry) | frozenset(segment_timelines), tuple(unreadable))

    @classmethod
    def of(cls, histories: dict[int, list[tuple[int, int]]], segment_timelines: Iterable[int] = ()) -> TimelineTree:
        """A tree from parsed history files (``{timeline: parse_history(text)}``), for callers that hold them."""
        return cls({t: tuple(e) for t, e in histories.items()}, frozenset(histories) | frozenset(segment_timelines))

    @property
    def newest(self) -> int | None:
        """The highest known timeline: what PostgreSQL's ``recovery_target_timeline = 'latest'`` picks."""
        return max(self.known, default=None)

    def history(self, timeline: int) -> tuple[tuple[int, int], ...]:
        return self.ancestry.get(timeline, ())

    def fork_point(self, timeline: int, ancestor: int) -> int | None:
        """Where ``timeline``'s history leaves ``ancestor`` (an LSN); None: ``ancestor`` is none of its ancestors."""
        return next((lsn for parent, lsn in self.history(timeline) if parent == ancestor), None)

    def holds(self, timeline: int, on: int, lsn: int) -> bool:
        """Whether position ``lsn`` on timeline ``on`` belongs to ``timeline``'s history (module docstring)."""
        if on == timeline:
            return True
        fork = self.fork_point(timeline, on)
        return fork is not None and lsn <= fork

    def descendants_holding(self, on: int, lsn: int) -> list[int]:
        """Every known timeline (``on`` included) whose history holds ``lsn`` on ``on``, ascending."""
        return sorted(t for t in self.known | {on} if self.holds(t, on, lsn))

    def steps(self, timeline: int, segment_size: int, start_segno: int | None = None) -> list[TimelineStep]:
        """The path to ``timeline``: from its oldest ancestor, or from segment ``start_segno`` on when given."""
        entries = self.history(timeline)
        path = [TimelineStep(entries[0][0] if entries else timeline, 0)]
        for index, (_parent, switch_lsn) in enumerate(entries):
            child = entries[index + 1][0] if index + 1 < len(entries) else timeline
            path.append(TimelineStep(child, switch_lsn // segment_size))
        if start_segno is None:
            return path
        return [TimelineStep(timeline_for(path, start_segno), 0), *(s for s in path if s.first_segno > start_segno)]

    def newest_through(self, on: int, segno: int, segment_size: int) -> int:
        """The newest timeline whose path reads segment ``segno`` from ``on`` (segment-granular ``holds``)."""
        return max((t for t in self.known | {on} if timeline_for(self.steps(t, segment_size), segno) == on),
                   default=on)
