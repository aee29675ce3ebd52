"""What the snapshots can restore to, per timeline: the ranges ``list``, ``status``, planning and the drill read.

A snapshot restores onto every timeline whose history holds its end (``wal.timelines``: on its own
timeline, or on a descendant that forked off after the snapshot was consistent). On each such timeline
it reaches from its consistency point (``restorable_from``) to the end of the WAL run unbroken from its
start along that timeline's path. A snapshot taken on timeline 1 *after* timeline 2 forked off reaches
timeline 1 only; one taken before the fork reaches both, with a range on each.

Across a major upgrade (``catalog.generations``) a snapshot reaches no further than its generation's
WAL: the archive's generation records say where the next system's WAL begins (``boundaries``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.generations import boundaries, major_of_version, read_generations
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.storage.base import Storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import Coverage, coverages
from backup_tasks.wal.names import parse_lsn, position, segment_number, timeline_of
from backup_tasks.wal.timelines import TimelineStep, TimelineTree


@dataclass
class SnapshotRange:
    """What one snapshot restores to on one timeline (``timeline``: the recovery target timeline)."""

    snapshot: Manifest
    coverage: Coverage
    restorable_from: datetime
    restorable_until: datetime
    steps: list[TimelineStep] = field(default_factory=list)  # the path recovery reads, from the snapshot's start

    @property
    def timeline(self) -> int:
        return self.coverage.timeline

    @property
    def major(self) -> int | None:
        """The PostgreSQL major of the snapshot's generation."""
        return major_of_version(self.snapshot.server_version)

    def covers(self, moment: datetime) -> bool:
        return self.restorable_from <= moment <= self.restorable_until

    def describe(self) -> str:
        gap = f" (WAL segment {self.coverage.gap} is missing after that)" if self.coverage.gap else ""
        return (f"{format_moment(self.restorable_from)} to {format_moment(self.restorable_until)} on timeline "
                f"{self.timeline} from snapshot {self.snapshot.id}{gap}")

    def to_dict(self) -> dict[str, Any]:
        """One entry of ``list --json``'s ``restorable``."""
        return {"backup_id": self.snapshot.id, "timeline": self.timeline,
                "system_identifier": self.snapshot.system_identifier, "major": self.major,
                "restorable_from": self.restorable_from.isoformat(),
                "restorable_until": self.restorable_until.isoformat(), "wal_gap": self.coverage.gap,
                "wal_segments": self.coverage.segments}


def format_moment(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


def snapshot_end(snapshot: Manifest) -> tuple[int, int]:
    """``(timeline, LSN)`` where the snapshot is consistent: a timeline it restores onto must hold this position."""
    size = int(snapshot.wal_segment_size or 0)
    timeline = snapshot.timeline or timeline_of(str(snapshot.start_segment))
    if snapshot.stop_lsn:
        return timeline, parse_lsn(snapshot.stop_lsn)
    # An old manifest without its end LSN: the end of its stop segment (never later than the truth).
    return timeline, (segment_number(str(snapshot.stop_segment or snapshot.start_segment), size) + 1) * size


def read_tree(archive: WalArchive) -> TimelineTree:
    """The archive's timeline tree, with the timelines known from its segments too."""
    return TimelineTree.read(archive, archive.segment_runs())


def restorable_ranges(storage: Storage, archive: WalArchive, snapshots: list[Manifest] | None = None, *,
                      tree: TimelineTree | None = None) -> list[SnapshotRange]:
    """Every complete snapshot on every timeline it restores onto, given the archive as it is now.

    Oldest snapshot first, each by ascending timeline. ``snapshots``: the catalog's, when the caller has
    read it already (the exporter, per scrape). One pass over the archive for all of them (12 weekly
    snapshots over 100,000+ segments), not one each. A hole in an archive read with ``copy_on_gap`` is
    looked for in its copy too, and the ranges read again.
    """
    if snapshots is None:
        snapshots = catalog.catalog(storage, kind="snapshot")
    snaps = [snap for snap in snapshots if snap.restorable and snap.restorable_from]
    runs = archive.segment_runs()
    tree = tree or TimelineTree.read(archive, runs)
    pairs = [(snap, timeline) for snap in snaps for timeline in tree.descendants_holding(*snapshot_end(snap))]
    bounds = boundaries(read_generations(None, archive.primary))  # where each later system's WAL begins
    found = coverages(archive, [(str(s.start_segment), int(s.wal_segment_size or 0), t) for s, t in pairs],
                      tree=tree, runs=runs, bounds=bounds)
    ranges = []
    for (snap, timeline), cov in zip(pairs, found, strict=True):
        assert snap.restorable_from is not None
        start = datetime.fromisoformat(snap.restorable_from)
        until = start
        if cov.covered_until is not None and cov.end_segment is not None and snap.stop_segment and \
                position(cov.end_segment) >= position(str(snap.stop_segment)):
            until = max(start, cov.covered_until)
        size = int(snap.wal_segment_size or 0)
        steps = tree.steps(timeline, size, segment_number(str(snap.start_segment), size))
        ranges.append(SnapshotRange(snap, cov, start, until, steps))
    if any(r.coverage.gap for r in ranges) and archive.see_the_copy():
        return restorable_ranges(storage, archive, snapshots)
    return ranges


def newest_per_snapshot(ranges: list[SnapshotRange]) -> list[SnapshotRange]:
    """Each snapshot's range on the newest timeline it restores onto (what recovery to its latest point follows)."""
    newest: dict[str, SnapshotRange] = {}
    for r in ranges:
        if r.snapshot.id not in newest or r.timeline > newest[r.snapshot.id].timeline:
            newest[r.snapshot.id] = r
    return [r for r in ranges if newest[r.snapshot.id] is r]


def snapshot_ranges(storage: Storage, archive: WalArchive,
                    snapshots: list[Manifest] | None = None) -> list[SnapshotRange]:
    """One range per complete snapshot (oldest first): on the newest timeline it restores onto."""
    return newest_per_snapshot(restorable_ranges(storage, archive, snapshots))


def describe_ranges(ranges: list[SnapshotRange]) -> str:
    if not ranges:
        return "nothing: there is no complete snapshot"
    return "; ".join(r.describe() for r in ranges)


def random_moment(ranges: list[SnapshotRange], rng: Any) -> datetime | None:
    """A uniformly random moment in the union of the snapshots' ranges."""
    spans = [(r.restorable_from, r.restorable_until) for r in ranges if r.restorable_until > r.restorable_from]
    total = sum((b - a).total_seconds() for a, b in spans)
    if total <= 0:
        return None
    pick = rng.random() * total
    for begin, end in spans:
        length = (end - begin).total_seconds()
        if pick <= length:
            return begin + timedelta(seconds=pick)
        pick -= length
    return spans[-1][1]
