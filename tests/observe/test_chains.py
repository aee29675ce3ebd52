"""Chains at a glance: ``status`` and the metrics tell full from incremental snapshots and say what a restore replays.

The scene's two full snapshots start at segments 0x10 and 0x18; here an incremental on the second starts at 0x1C
(consistent in 0x1D), and the archive ends at 0x20.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

from backup_tasks.catalog.manifest import Manifest, save_new
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.observe.facts import collect
from backup_tasks.observe.metrics import exposition
from backup_tasks.observe.status import document, render_text
from tests.support.observe import samples, value

if TYPE_CHECKING:
    from tests.support.observe import Scene


def with_incremental(scene: Scene) -> Manifest:
    full = scene.snapshots[1]
    started = scene.completed_at(0x1C) - timedelta(minutes=5)
    backup_id = f"aitrapp-snapshot-{started.strftime('%Y%m%dT%H%M%SZ')}"
    incremental = replace(full, id=backup_id, started_at=isoformat(started),
                          finished_at=isoformat(started + timedelta(minutes=1)), path=f"{backup_id}.base.tar.zst",
                          size_bytes=42_000_000, start_segment=scene.segment(0x1C), stop_segment=scene.segment(0x1D),
                          restorable_from=scene.completed_at(0x1D).isoformat(), parent=full.id,
                          chain=[full.id, backup_id], verification=None, pitr_drill=None)
    save_new(scene.storage, incremental)
    scene.storage.put_bytes(incremental.path, b"data")
    return incremental


def test_status_names_the_chain_and_the_replay_from_its_newest_member(scene: Scene) -> None:
    incremental = with_incremental(scene)
    full = scene.snapshots[1]
    doc = document(collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now),
                   scene.settings)
    newest = doc["newest_snapshot"]
    assert (newest["id"], newest["chain"], newest["incremental"]) == \
        (incremental.id, [full.id, incremental.id], True)
    # The latest moment is restored from the incremental: 0x1C..0x20, not from its full's start (0x18: 9 segments);
    # the longest replay is just before the second full, from the first (0x10..0x19).
    replay = {"snapshot_id": incremental.id, "chain": [full.id, incremental.id],
              "from_segment": scene.segment(0x1C), "to_segment": scene.segment(0x20), "segments": 5,
              "max_segments": 10}
    assert doc["recovery_window"]["replay"] == replay
    assert [w["replay"] for w in doc["recovery_window"]["timelines"]] == [replay]
    text = {line[:16].strip(): line[17:] for line in render_text(doc, scene.settings).splitlines()[1:]}
    assert text["newest snapshot"].endswith(", incremental (chain of 2); the latest moment replays 5 WAL segments "
                                            "(up to 10 for an earlier moment)"), text["newest snapshot"]


def test_a_full_is_its_own_chain(scene: Scene) -> None:
    doc = document(collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now),
                   scene.settings)
    newest = doc["newest_snapshot"]
    assert (newest["chain"], newest["incremental"]) == ([scene.snapshots[1].id], False)
    assert doc["recovery_window"]["replay"]["segments"] == 9  # 0x18..0x20


def test_the_metrics_label_snapshots_by_chain_and_keep_the_per_kind_series(scene: Scene) -> None:
    incremental = with_incremental(scene)
    parsed = samples(exposition(collect(scene.settings, storage=scene.storage, archive=scene.archive,
                                        now=scene.now)))
    db = {"database": "aitrapp"}
    assert value(parsed, "backup_tasks_snapshots", chain="full", **db) == 2
    assert value(parsed, "backup_tasks_snapshots", chain="incremental", **db) == 1
    assert value(parsed, "backup_tasks_last_snapshot_timestamp_seconds", chain="incremental", **db) == \
        parse_time(incremental.finished_at).timestamp()
    assert value(parsed, "backup_tasks_last_snapshot_timestamp_seconds", chain="full", **db) == \
        parse_time(scene.snapshots[1].finished_at).timestamp()
    assert value(parsed, "backup_tasks_last_snapshot_size_bytes", chain="incremental", **db) == 42_000_000
    assert value(parsed, "backup_tasks_newest_snapshot_chain_length", **db) == 2
    assert value(parsed, "backup_tasks_recovery_window_replay_segments", **db) == 5
    assert value(parsed, "backup_tasks_recovery_window_max_replay_segments", **db) == 10
    # What the alert rules read is unchanged: one series per kind, the newest snapshot of either label.
    assert value(parsed, "backup_tasks_backups", kind="snapshot", **db) == 3
    assert value(parsed, "backup_tasks_last_success_timestamp_seconds", kind="snapshot", **db) == \
        parse_time(incremental.finished_at).timestamp()
    assert {labels for name, labels in parsed if name == "backup_tasks_last_size_bytes"} == \
        {frozenset({("database", "aitrapp"), ("kind", "dump")}), frozenset({("database", "aitrapp"),
                                                                             ("kind", "snapshot")})}
