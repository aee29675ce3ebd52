"""The timeline tree (``wal.timelines``) and what coverage and the snapshots' ranges make of it.

The archive here is the issue's after a fork: timeline 1 goes on after timeline 2 branched off it, both
archiving into the same archive. Segments are tiny objects with valid trailers (``test_index``'s helpers);
the history file is a real archived object.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.physical.ranges import newest_per_snapshot, restorable_ranges
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import coverages
from backup_tasks.wal.names import segment_name
from backup_tasks.wal.timelines import TimelineStep, TimelineTree
from tests.support.wal import SEGMENT_SIZE as SIZE
from tests.support.wal import put_history, put_segment

FORK = 10 * SIZE + 0x28  # timeline 2 begins in segment 10 of timeline 1


def test_a_position_belongs_to_a_timeline_up_to_its_fork_point() -> None:
    later = 14 * SIZE + 0x100
    tree = TimelineTree.of({2: [(1, FORK)], 3: [(1, FORK), (2, later)]}, segment_timelines=[1, 2, 3])
    assert tree.newest == 3
    assert tree.holds(2, 1, FORK) and not tree.holds(2, 1, FORK + 1), "up to the fork point, not after it"
    assert tree.holds(3, 2, later) and not tree.holds(3, 2, later + 8) and tree.holds(3, 1, 0)
    assert not tree.holds(1, 2, FORK + 100), "a child's positions are not on its parent"
    assert tree.descendants_holding(1, FORK - 8) == [1, 2, 3]
    assert tree.descendants_holding(1, FORK + 8) == [1], "taken on timeline 1 after the fork: timeline 1 only"
    assert tree.descendants_holding(2, later + 8) == [2]
    assert tree.steps(3, SIZE) == [TimelineStep(1, 0), TimelineStep(2, 10), TimelineStep(3, 14)]
    assert tree.steps(3, SIZE, start_segno=12) == [TimelineStep(2, 0), TimelineStep(3, 14)]


@pytest.fixture
def forked(tmp_path: Path) -> WalArchive:
    """Timeline 1: segments 0-20 (it went on after the fork); timeline 2: segments 10-14, from FORK."""
    archive = WalArchive.in_directory(tmp_path / "wal")
    archive.ensure()
    put_history(archive, tmp_path, 2, [(1, FORK)])
    for segno in range(21):
        put_segment(archive.root, segment_name(1, segno, SIZE))
    for segno in range(10, 15):
        put_segment(archive.root, segment_name(2, segno, SIZE))
    return archive


def test_coverage_follows_a_timeline_only_from_before_its_fork(forked: WalArchive) -> None:
    before, after, explicit = coverages(forked, [(segment_name(1, 2, SIZE), SIZE), (segment_name(1, 12, SIZE), SIZE),
                                                 (segment_name(1, 2, SIZE), SIZE, 1)])
    # Before the fork: recovery to the newest timeline; timeline 1's later segments are another branch, no gap.
    assert (before.timelines, before.end_segment, before.gap) == ([1, 2], segment_name(2, 14, SIZE), None)
    assert before.last_archived == segment_name(2, 14, SIZE)
    # Started on timeline 1 after the fork: timeline 2 is no descendant of that position.
    assert (after.timelines, after.end_segment, after.gap) == ([1], segment_name(1, 20, SIZE), None)
    # Asked for timeline 1 explicitly: the old timeline to its end.
    assert (explicit.timeline, explicit.end_segment, explicit.segments) == (1, segment_name(1, 20, SIZE), 19)


def snapshot(backup_id: str, start_segno: int, stop_lsn: int) -> Manifest:
    return Manifest(id=backup_id, kind="snapshot", database="shop", server="db:5432", server_version="15.4",
                    started_at="1970-01-01T00:00:00+00:00", finished_at="1970-01-01T00:00:00+00:00",
                    path=f"{backup_id}.base.tar.zst", size_bytes=1, sha256="0" * 64, compression="zstd",
                    timeline=1, wal_segment_size=SIZE, start_lsn=f"0/{start_segno * SIZE:X}",
                    stop_lsn=f"0/{stop_lsn:X}", start_segment=segment_name(1, start_segno, SIZE),
                    stop_segment=segment_name(1, (stop_lsn - 1) // SIZE, SIZE),
                    restorable_from=datetime.fromtimestamp(start_segno + 1, UTC).isoformat())


def test_each_snapshot_restores_onto_the_timelines_that_hold_it(forked: WalArchive) -> None:
    """The issue's case: S2, taken on timeline 1 after the fork, never claims moments of timeline 2."""
    s1, s2 = snapshot("s1", 2, 3 * SIZE), snapshot("s2", 12, 13 * SIZE)
    ranges = restorable_ranges(None, forked, [s1, s2])  # type: ignore[arg-type]
    found = {(r.snapshot.id, r.timeline): r for r in ranges}
    assert list(found) == [("s1", 1), ("s1", 2), ("s2", 1)]
    # A trailer's completion time is the segment number here: the ranges end where each path ends.
    assert found[("s1", 2)].restorable_until == datetime.fromtimestamp(14, UTC)
    assert found[("s1", 1)].restorable_until == found[("s2", 1)].restorable_until == datetime.fromtimestamp(20, UTC)
    assert [(r.snapshot.id, r.timeline) for r in newest_per_snapshot(ranges)] == [("s1", 2), ("s2", 1)]
