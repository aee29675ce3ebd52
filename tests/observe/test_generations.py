"""After a major upgrade, each generation is judged on its own (issue 20, item 2): health, status, metrics, prune.

The scene (built like ``tests.support.observe``'s, same clock and segment times): PostgreSQL 15 (system
``OLD``) archived segments 0x10-0x1A with two snapshots; ``pg_upgrade`` skipped the names 0x1B and 0x1C;
PostgreSQL 18 (system ``NEW``) archives from 0x1D on, which the archive's generation record names as
its first segment, as the first wal-push of the new system writes it. The new server's first snapshot
(from 0x1E) is there or not.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog.manifest import Manifest, save_new
from backup_tasks.catalog.prune import prune
from backup_tasks.observe.facts import collect
from backup_tasks.observe.health import check_health
from backup_tasks.observe.metrics import exposition
from backup_tasks.observe.status import document, render_text
from backup_tasks.physical.upgrade import release_old
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from backup_tasks.wal import state
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.system import IDENTITY_KEY, generation_key, put_record
from tests.support.observe import DATABASE, NOW, _dump, _snapshot, completed_at, samples, segment, value

OLD, NEW = "7000000000000000015", "7400000000000000018"
OLD_WAL, SKIPPED, NEW_WAL = range(0x10, 0x1B), (0x1B, 0x1C), range(0x1D, 0x21)
NO_SNAPSHOT = f"the new server (PostgreSQL 18, system {NEW}) has no snapshot yet: take one"


def snapshot_of(system: str, version: str, start: int) -> Manifest:
    return replace(_snapshot(completed_at(start) - timedelta(minutes=5), start, drill_ok=True),
                   system_identifier=system, server_version=version)


class Upgraded:
    """The scene on disk (BACKUP_DIR and its WAL archive), so prune and ``upgrade --release-old`` run as they do."""

    def __init__(self, base: Path, *, new_snapshot: bool) -> None:
        self.settings = Settings(backup_dir=str(base / "backups"), wal_archive_dir=str(base / "wal"),
                                 broker_url="memory://", keep_weekly=1, keep_daily_days=7)
        self.storage = LocalStorage(base / "backups")
        self.storage.ensure()
        self.old_snapshots = [snapshot_of(OLD, "15.4", 0x10), snapshot_of(OLD, "15.4", 0x14)]
        self.new_snapshot = snapshot_of(NEW, "18.1", 0x1E) if new_snapshot else None
        dumps = [replace(_dump(NOW - timedelta(days=2, hours=6), True), system_identifier=OLD),
                 replace(_dump(NOW - timedelta(hours=6), True), system_identifier=NEW, server_version="18.1")]
        for m in [*dumps, *self.old_snapshots, *([self.new_snapshot] if self.new_snapshot else [])]:
            save_new(self.storage, replace(m, size_bytes=4))  # as stored: health compares the sizes
            self.storage.put_bytes(m.path, b"data")
        self.archive = WalArchive.in_directory(base / "wal")
        self.archive.ensure()
        pg_wal = base / "pg_wal"
        pg_wal.mkdir()
        for n in [*OLD_WAL, *NEW_WAL]:
            source = pg_wal / segment(n)
            source.write_bytes(bytes([n]) * 4096)
            os.utime(source, (completed_at(n).timestamp(),) * 2)
            self.archive.push(source)
        newest = segment(NEW_WAL[-1])
        state.record(self.archive.root, newest, self.archive.trailer(newest).completed_at, copy_where=None,
                     copy_stored=False, now=NOW.timestamp() - 39.8)
        # What wal-push's and the backups' system checks record (``wal.system``): the first generation, then the
        # new system's, opened by its first segment in the archive.
        for location in (self.storage, self.archive.primary):
            put_record(location, IDENTITY_KEY, {"system_identifier": OLD, "major": 15, "recorded_at": "2026-11-01"})
            put_record(location, generation_key(NEW), {
                "system_identifier": NEW, "major": 18, "opened_at": "2026-11-30T06:00:00Z", "reason": "automatic",
                "previous": OLD, "first_segment": segment(NEW_WAL[0])})

    def health(self) -> dict[str, object]:
        report = check_health(self.settings, now=NOW, storage=self.storage, archive=self.archive)
        return {"ok": report.ok, "problems": report.problems, "wal": report.wal}

    def status(self) -> tuple[dict[str, object], str]:
        doc = document(collect(self.settings, storage=self.storage, archive=self.archive, now=NOW), self.settings)
        return doc, render_text(doc, self.settings)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return samples(exposition(collect(self.settings, storage=self.storage, archive=self.archive, now=NOW)))


@pytest.fixture(params=[True, False], ids=["with-new-snapshot", "no-new-snapshot-yet"])
def upgraded(request: pytest.FixtureRequest, tmp_path: Path) -> Upgraded:
    return Upgraded(tmp_path, new_snapshot=request.param)


def test_the_boundary_between_generations_is_no_gap(upgraded: Upgraded) -> None:
    health = upgraded.health()
    assert health["wal"]["lost"] == [] and not [p for p in health["problems"] if "lost" in p or "gap" in p], health
    doc, text = upgraded.status()
    assert doc["wal"]["gaps"] == [] and "; no gaps" in text
    # The old generation's way back ends at its last archived segment, not at a false gap before the new WAL.
    parsed = upgraded.metrics()
    old_end = value(parsed, "backup_tasks_restorable_range_end_timestamp_seconds", database=DATABASE, timeline="1",
                    system=OLD)
    assert datetime.fromtimestamp(old_end, NOW.tzinfo) == completed_at(OLD_WAL[-1])
    generations = {g["system_identifier"]: g for g in doc["generations"]}
    assert [g["major"] for g in doc["generations"]] == [15, 18]
    assert generations[NEW]["first_segment"] == segment(NEW_WAL[0])
    assert {w["snapshot_id"] for w in generations[OLD]["windows"]} == {upgraded.old_snapshots[0].id}


def test_the_new_generation_without_a_snapshot_is_a_problem_that_says_take_one(upgraded: Upgraded) -> None:
    health = upgraded.health()
    doc, text = upgraded.status()
    named = [p for p in health["problems"] if p.startswith(NO_SNAPSHOT)]
    if upgraded.new_snapshot is None:
        assert health["ok"] is False and len(named) == 1, health["problems"]
        assert "`backup-tasks upgrade --finish`" in named[0] and "`backup-tasks snapshot`" in named[0]
        assert doc["generation_problem"] == named[0] and f"PROBLEM {named[0]}" in text.splitlines()
    else:
        assert health == {**health, "ok": True, "problems": []}
        assert doc["generation_problem"] is None and "PROBLEM" not in text
        assert doc["recovery_window"]["snapshot_id"] == upgraded.new_snapshot.id, "the window is the new server's"
        assert any(line.startswith(f"  old generation PostgreSQL 15 (system {OLD}): restorable up to ")
                   for line in text.splitlines()), text


def test_the_metrics_carry_each_generations_system(upgraded: Upgraded) -> None:
    parsed = upgraded.metrics()
    counts = {dict(labels)["system"]: (dict(labels)["major"], v) for (name, labels), v in parsed.items()
              if name == "backup_tasks_generation_snapshots"}
    assert counts == {OLD: ("15", 2.0), NEW: ("18", 1.0 if upgraded.new_snapshot else 0.0)}
    ranges = {dict(labels)["system"] for (name, labels), _v in parsed.items()
              if name == "backup_tasks_restorable_range_start_timestamp_seconds"}
    assert ranges == ({OLD, NEW} if upgraded.new_snapshot else {OLD})
    if upgraded.new_snapshot is not None:
        end = value(parsed, "backup_tasks_restorable_range_end_timestamp_seconds", database=DATABASE, timeline="1",
                    system=NEW)
        assert datetime.fromtimestamp(end, NOW.tzinfo) == completed_at(NEW_WAL[-1])


def test_retention_keeps_each_generations_newest_chain_until_released(tmp_path: Path) -> None:
    scene = Upgraded(tmp_path, new_snapshot=True)
    assert scene.new_snapshot is not None
    oldest, newest_old = scene.old_snapshots
    # BACKUP_KEEP_WEEKLY=1: the new server's snapshot, and the old generation's newest chain (its way back).
    report = prune(scene.settings, dry_run=True, now=NOW)
    kept = {d.backup_id for d in report.decisions if d.kind == "snapshot" and d.keep}
    assert kept == {scene.new_snapshot.id, newest_old.id}
    assert "until `backup-tasks upgrade --release-old`" in next(
        d.reason for d in report.decisions if d.backup_id == newest_old.id)
    assert report.deleted == [oldest.id]
    assert report.wal_deleted == [segment(n) for n in range(OLD_WAL[0], 0x14)], "WAL from the old chain on is kept"

    released = release_old(scene.settings)
    assert [g["system_identifier"] for g in released["released"]] == [OLD]
    assert json.loads(scene.storage.read_bytes(f"generations/release-{OLD}.json"))["major"] == 15
    report = prune(scene.settings, dry_run=True, now=NOW)
    kept = {d.backup_id for d in report.decisions if d.kind == "snapshot" and d.keep}
    assert kept == {scene.new_snapshot.id}
    assert set(report.deleted) >= {oldest.id, newest_old.id}
