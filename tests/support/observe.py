"""Pytest plugin: a known state of the backups for the observe tests (fixtures ``scene``, ``disk_scene``).

``NOW`` is fixed. The catalog: three dumps (verified ok two days ago, FAILED verification yesterday,
not yet verified today) and two snapshots ten and three days old, the older with a failed drill, the
newer with a passed one (RTO 4.2 s). The WAL archive is a real one (``WalArchive.push`` of small
files): segments 0x10 to 0x20 on timeline 1, the newest completed 40 s before ``NOW``, and the state
file wal-push leaves. ``scene`` keeps the catalog in the memory storage; ``disk_scene`` writes it to a
``BACKUP_DIR`` with the archive at ``BACKUP_DIR/wal``, for the commands.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup_tasks.catalog.manifest import Manifest, Verification, save_new
from backup_tasks.clock import isoformat
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.wal import state
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import segment_name

NOW = datetime(2026, 11, 30, 8, 30, tzinfo=UTC)  # 14:00 in Asia/Kolkata
SEGMENT_SIZE = 16 << 20
FIRST, LAST = 0x10, 0x20
#: The newest segment was completed this long before NOW: the recovery window's end is 40 s old.
END_AGE = 40.0
DATABASE = "aitrapp"


def segment(n: int) -> str:
    return segment_name(1, n, SEGMENT_SIZE)


def completed_at(n: int) -> datetime:
    """Segment ``n`` was completed one hour after ``n - 1``; the last one ``END_AGE`` s before NOW."""
    return NOW - timedelta(seconds=END_AGE) - timedelta(hours=LAST - n)


@dataclass
class Scene:
    storage: Storage
    archive: WalArchive
    settings: Settings
    dumps: list[Manifest]
    snapshots: list[Manifest]
    now: datetime = NOW
    end_age: float = END_AGE
    first: int = FIRST
    last: int = LAST

    @staticmethod
    def segment(n: int) -> str:
        return segment(n)

    @staticmethod
    def completed_at(n: int) -> datetime:
        return completed_at(n)

    def without_segment(self, n: int) -> None:
        self.archive.path_for(segment(n)).unlink()


def _dump(started: datetime, verified: bool | None) -> Manifest:
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    finished = started + timedelta(seconds=95)
    verification = None if verified is None else Verification(
        ok=verified, verified_at=isoformat(finished + timedelta(minutes=2)), duration_seconds=31.5,
        method="throwaway-cluster", checked=["sha256", "restore", "row-counts", "amcheck"],
        problems=[] if verified else ["public.orders: 9986 rows in the manifest, 9985 restored"])
    return Manifest(id=f"{DATABASE}-dump-{stamp}", kind="dump", database=DATABASE, server="db:5432",
                    server_version="15.4", started_at=isoformat(started), finished_at=isoformat(finished),
                    path=f"{DATABASE}-dump-{stamp}.dump.zst", size_bytes=3_455_042 + int(started.timestamp()) % 1000,
                    sha256="0" * 64, compression="zstd", verification=verification)


def _snapshot(started: datetime, start: int, drill_ok: bool) -> Manifest:
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    drilled = started + timedelta(hours=1)
    return Manifest(id=f"{DATABASE}-snapshot-{stamp}", kind="snapshot", database=DATABASE, server="db:5432",
                    server_version="15.4", started_at=isoformat(started),
                    finished_at=isoformat(started + timedelta(minutes=3)),
                    path=f"{DATABASE}-snapshot-{stamp}.base.tar.zst",
                    size_bytes=1_150_000_000, sha256="0" * 64, compression="zstd", format="pg_basebackup-tar",
                    timeline=1, wal_segment_size=SEGMENT_SIZE, start_segment=segment(start),
                    stop_segment=segment(start + 1), restorable_from=completed_at(start + 1).isoformat(),
                    verification=Verification(ok=True, verified_at=isoformat(drilled), duration_seconds=12.0,
                                              method="throwaway-cluster", checked=["restore"]),
                    pitr_drill={"ok": drill_ok, "snapshot_id": f"{DATABASE}-snapshot-{stamp}",
                                "target_time": isoformat(started - timedelta(hours=5)),
                                "duration_seconds": 4.2 if drill_ok else 7.5, "problems": [] if drill_ok else
                                ["the copy replayed a transaction after the target"],
                                "drilled_at": isoformat(drilled)})


def build(storage: Storage, archive_root: Path, settings: Settings) -> Scene:
    dumps = [_dump(NOW - timedelta(days=2, hours=6), True), _dump(NOW - timedelta(days=1, hours=6), False),
             _dump(NOW - timedelta(hours=6), None)]
    snapshots = [_snapshot(completed_at(FIRST) - timedelta(minutes=5), FIRST, drill_ok=False),
                 _snapshot(completed_at(0x18) - timedelta(minutes=5), 0x18, drill_ok=True)]
    for m in [*dumps, *snapshots]:
        save_new(storage, m)
        storage.put_bytes(m.path, b"data")
    archive = WalArchive.in_directory(archive_root)
    archive.ensure()
    pg_wal = archive_root.parent / "pg_wal"
    pg_wal.mkdir(exist_ok=True)
    for n in range(FIRST, LAST + 1):
        source = pg_wal / segment(n)
        source.write_bytes(bytes([n]) * 4096)
        os.utime(source, (completed_at(n).timestamp(),) * 2)
        archive.push(source)
    newest = segment(LAST)
    state.record(archive.root, newest, archive.trailer(newest).completed_at, copy_where=None, copy_stored=False,
                 now=NOW.timestamp() - END_AGE + 0.2)
    return Scene(storage, archive, settings, dumps, snapshots)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    """The catalog in the memory storage, the WAL archive in ``tmp_path/wal``."""
    settings = Settings(backup_dir=str(tmp_path / "unused"), wal_archive_dir=str(tmp_path / "wal"),
                        broker_url="memory://")
    return build(MemoryStorage(), tmp_path / "wal", settings)


@pytest.fixture
def disk_scene(tmp_path: Path) -> Callable[..., Scene]:
    """Factory: the scene in ``<base or tmp_path>/backups`` (archive in ``backups/wal``), settings overridden."""

    def make(base: Path | None = None, **overrides: object) -> Scene:
        backup_dir = (base or tmp_path) / "backups"
        settings = replace(Settings(backup_dir=str(backup_dir), broker_url="memory://"), **overrides)  # type: ignore[arg-type]
        storage = LocalStorage(backup_dir)
        storage.ensure()
        return build(storage, backup_dir / "wal", settings)

    return make


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, parsed by prometheus_client's own parser: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: Samples, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]
