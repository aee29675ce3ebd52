"""The catalog on the memory driver: listing, retention and prune, health, idempotency, in milliseconds.

No PostgreSQL, no disk for the catalog: manifests are built with ``catalog.manifest.Manifest`` and
stored with their data objects in a ``MemoryStorage``, which prune and health take instead of
opening the settings' locations.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest, Verification
from backup_tasks.catalog.prune import prune
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.errors import BackupIdTaken, BackupNotFound, StorageError
from backup_tasks.observe.health import check_health
from backup_tasks.settings import Settings
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.storage.objectlock import ObjectLock

NOW = datetime(2026, 11, 27, 2, 5, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # File locks (no Redis); the WAL archive <backup_dir>/wal does not exist.
    return Settings(backup_dir=str(tmp_path / "backups"), broker_url="memory://", keep_daily_days=7, keep_weekly=3)


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage("catalog")


def backup(storage: MemoryStorage, days_ago: float, *, verified: bool | None = None, kind: str = "dump",
           database: str = "aitrapp", size: int = 10, stored: int | None = None, trading_day: str | None = None,
           state: str = "complete", start_segment: str | None = None) -> Manifest:
    """Store a backup taken ``days_ago`` before NOW: its data object(s) of ``stored`` bytes, then its manifest."""
    started = NOW - timedelta(days=days_ago)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    backup_id = f"{database}-{kind}-{stamp}"
    verification = None if verified is None else Verification(
        ok=verified, verified_at=isoformat(started + timedelta(minutes=30)), duration_seconds=1.0,
        method="throwaway-cluster", checked=["sha256", "restore"], problems=[] if verified else ["row counts differ"])
    files = None
    path = f"{backup_id}.dump.zst"
    if kind == "snapshot":
        files = {f"{backup_id}.{part}": {"size": size, "sha256": "0" * 64, "role": part}
                 for part in ("base.tar.zst", "pg_wal.tar.zst", "backup_manifest", "config.json")}
        path = f"{backup_id}.base.tar.zst"
    manifest = Manifest(id=backup_id, kind=kind, database=database, server="db:5432", server_version="16.4",
                        started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=5)),
                        path=path, size_bytes=size, sha256="0" * 64, compression="zstd", verification=verification,
                        trading_day=trading_day, state=state, files=files, start_segment=start_segment)
    for key in files or [path]:
        storage.put_bytes(key, b"x" * (size if stored is None else stored))
    catalog.save_new(storage, manifest)
    return manifest


def keys_of(manifest: Manifest) -> list[str]:
    return [*(manifest.files or [manifest.path]), manifest.key]


def present(storage: MemoryStorage, manifest: Manifest) -> bool:
    found = [storage.exists(key) for key in keys_of(manifest)]
    assert all(found) or not any(found), f"{manifest.id} is half there: {found}"
    return all(found)


# --- the catalog -------------------------------------------------------------------------------------

def test_catalog_lists_top_level_manifests_oldest_first(storage: MemoryStorage) -> None:
    old, new = backup(storage, 3), backup(storage, 1)
    snap = backup(storage, 2, kind="snapshot")
    other = backup(storage, 0, database="other")
    storage.put_bytes("notes.txt", b"not ours")
    storage.put_bytes("broken.manifest.json", b"{not json")
    # A manifest-looking object below the top level (the WAL archive's subtree) is never read.
    storage.put_bytes(f"wal/{other.id}-deeper.manifest.json", storage.read_bytes(other.key))
    assert [m.id for m in catalog.catalog(storage)] == [old.id, snap.id, new.id, other.id]
    assert [m.id for m in catalog.catalog(storage, kind="dump", database="aitrapp")] == [old.id, new.id]
    assert [m.id for m in catalog.catalog(storage, kind="snapshot")] == [snap.id]
    assert catalog.newest(storage).id == other.id
    assert catalog.newest(storage, database="aitrapp").id == new.id
    assert catalog.load(storage, snap.id).files == snap.files
    with pytest.raises(BackupNotFound):
        catalog.load(storage, "aitrapp-dump-20200101T000000Z")
    with pytest.raises(BackupNotFound):
        catalog.newest(MemoryStorage())


def test_a_new_manifest_never_replaces_one_and_a_verification_is_a_record_beside_it(storage: MemoryStorage) -> None:
    first = backup(storage, 1)
    rival = Manifest.from_dict({**first.to_dict(), "size_bytes": 999})
    with pytest.raises(BackupIdTaken, match="already in the catalog"):
        catalog.save_new(storage, rival)
    assert catalog.load(storage, first.id).size_bytes == first.size_bytes
    result = Verification(ok=True, verified_at=isoformat(NOW), duration_seconds=2.0, method="scratch-database",
                          checked=["sha256"])
    written = storage.read_bytes(first.key)
    catalog.record_verification(storage, first.id, result)
    reloaded = catalog.load(storage, first.id)
    assert reloaded.verified_ok and reloaded.verification == result and reloaded.size_bytes == first.size_bytes
    assert storage.read_bytes(first.key) == written, "the manifest is never rewritten"
    assert [m.verification for m in catalog.catalog(storage) if m.id == first.id] == [result]
    # A later verdict wins over an earlier one; both stay stored.
    failed = Verification(ok=False, verified_at=isoformat(NOW), duration_seconds=3.0, method="scratch-database",
                          checked=["sha256"], problems=["checksum mismatch"])
    catalog.record_verification(storage, first.id, failed)
    latest = catalog.load(storage, first.id)
    assert latest.verification == failed and len(latest.record_keys) == 2
    assert all(storage.exists(key) for key in latest.record_keys)
    assert set(latest.stored_keys) >= {first.path, *latest.record_keys} and first.key not in latest.stored_keys


def test_an_earlier_versions_manifest_with_its_verification_inside_still_reads(storage: MemoryStorage) -> None:
    verdict = Verification(ok=True, verified_at=isoformat(NOW), duration_seconds=1.0, method="throwaway-cluster",
                           checked=["restore"])
    old = backup(storage, 2)
    storage.put_bytes(old.key, Manifest.from_dict({**old.to_dict(), "verification": asdict(verdict)}).to_json()
                      .encode())
    assert catalog.load(storage, old.id).verification == verdict
    assert catalog.catalog(storage)[0].verification == verdict


def test_records_of_a_pruned_backup_are_orphans_and_unknown_records_are_ignored(
        settings: Settings, storage: MemoryStorage) -> None:
    kept, gone = backup(storage, 1), backup(storage, 2)
    for manifest in (kept, gone):
        catalog.add_record(storage, manifest.id, "drill", {"ok": True})
    storage.delete(gone.key)
    storage.put_bytes(f"{kept.id}.20260101T000000000000Z-000000.future-kind.record.json", b"{}")
    storage.put_bytes(f"{kept.id}.20260101T000000000000Z-000001.drill.record.json", b"{broken")
    assert catalog.load(storage, kept.id).pitr_drill == {"ok": True}
    assert [catalog.parse_record_key(k)[0] for k in catalog.orphan_records(storage)] == [gone.id]
    prune(settings, now=NOW, storage=storage)  # keeps both backups, deletes the orphan
    assert catalog.orphan_records(storage) == [] and catalog.load(storage, kept.id).pitr_drill == {"ok": True}


def test_existing_for_day_finds_only_a_complete_dump_of_that_database_and_day(storage: MemoryStorage) -> None:
    assert catalog.existing_for_day(storage, "aitrapp", "2026-11-26") is None
    backup(storage, 1.5, trading_day="2026-11-25")
    backup(storage, 0.9, trading_day="2026-11-26", state="failed")
    backup(storage, 0.8, trading_day="2026-11-26", database="other")
    backup(storage, 0.7, trading_day="2026-11-26", kind="snapshot")
    assert catalog.existing_for_day(storage, "aitrapp", "2026-11-26") is None
    done = backup(storage, 0.5, trading_day="2026-11-26")
    found = catalog.existing_for_day(storage, "aitrapp", "2026-11-26")
    assert found is not None and found.id == done.id
    assert catalog.existing_for_day(storage, "aitrapp", "2026-11-27") is None


# --- retention and prune -----------------------------------------------------------------------------

def test_prune_deletes_expired_dumps_dry_run_first(settings: Settings, storage: MemoryStorage) -> None:
    dumps = [backup(storage, days, verified=True) for days in (0, 1, 3, 6.9, 7.1, 9, 30)]
    storage.put_bytes("aitrapp_backup_20261101_020000.sql.gz", b"foreign")
    expired = {m.id for m in dumps[4:]}
    preview = prune(settings, dry_run=True, now=NOW, storage=storage)
    assert set(preview.deleted) == expired and preview.freed_bytes == 10 * len(expired)
    assert all(present(storage, m) for m in dumps)  # a dry run deletes nothing
    report = prune(settings, now=NOW, storage=storage)
    assert set(report.deleted) == expired and not report.dry_run
    assert [present(storage, m) for m in dumps] == [True] * 4 + [False] * 3
    assert storage.exists("aitrapp_backup_20261101_020000.sql.gz")
    assert report.wal_deleted == [] and report.wal_reason is None  # no WAL archive directory: nothing to do
    assert prune(settings, now=NOW, storage=storage).deleted == []


def test_prune_of_a_locked_bucket_reports_what_is_locked_and_deletes_it_once_the_lock_ends(tmp_path: Path) -> None:
    lock = ObjectLock(days=10)
    written = [NOW]  # the memory bucket's clock: each object is locked from when it was written
    storage = MemoryStorage("vault", lock=lock, clock=lambda: written[0])
    settings = Settings(backup_dir="s3://vault/nightly", wal_archive_dir=str(tmp_path / "wal"), broker_url="memory://",
                        keep_daily_days=7, keep_weekly=3, object_lock=lock)
    dumps = []
    for days in (0, 1, 8, 9, 30):
        written[0] = NOW - timedelta(days=days) + timedelta(minutes=5)
        dumps.append(backup(storage, days, verified=True))
    written[0] = NOW - timedelta(days=8)  # a verdict recorded later than the 9-day-old dump: its lock ends later
    catalog.add_record(storage, dumps[3].id, "verification", {"ok": True, "verified_at": isoformat(written[0]),
                                                               "duration_seconds": 1.0, "method": "m", "checked": []},
                       now=written[0])
    written[0] = NOW
    for dry_run in (True, False):
        report = prune(settings, dry_run=dry_run, now=NOW, storage=storage)
        assert report.deleted == [dumps[4].id] and report.freed_bytes == 10
        until = {entry.backup_id: parse_time(entry.locked_until) for entry in report.locked}
        assert until == {dumps[2].id: NOW - timedelta(days=8) + timedelta(minutes=5) + timedelta(days=10),
                         dumps[3].id: NOW - timedelta(days=8) + timedelta(days=10)}
    assert [present(storage, m) for m in dumps] == [True] * 4 + [False]  # nothing refused was even attempted
    # After the locks end, the next run deletes both, records included.
    later = NOW + timedelta(days=3)
    written[0] = later
    report = prune(settings, now=later, storage=storage)
    assert set(report.deleted) == {dumps[2].id, dumps[3].id} and report.locked == []
    assert not [o.key for o in storage.list() if o.key.startswith((dumps[2].id, dumps[3].id))]


def test_a_lock_prune_did_not_foresee_is_reported_as_locked_not_as_a_failure(settings: Settings) -> None:
    storage = MemoryStorage("vault", lock=ObjectLock(days=60), clock=lambda: NOW)  # the bucket's own, longer lock
    old = backup(storage, 30, verified=True)
    backup(storage, 0, verified=True)
    report = prune(settings, now=NOW, storage=storage)  # settings: no lock configured, a local BACKUP_DIR
    assert report.deleted == [] and [entry.backup_id for entry in report.locked] == [old.id]
    assert present(storage, old)


def test_prune_never_deletes_the_newest_nor_the_newest_verified(settings: Settings, storage: MemoryStorage) -> None:
    older_verified = backup(storage, 40, verified=True)
    newest_verified = backup(storage, 30, verified=True)
    failed = backup(storage, 20, verified=False)
    newest = backup(storage, 10)
    report = prune(settings, now=NOW, storage=storage)
    assert set(report.deleted) == {older_verified.id, failed.id}
    assert present(storage, newest_verified) and present(storage, newest)
    reasons = {d.backup_id: d.reason for d in report.decisions}
    assert reasons[newest_verified.id] == "newest verified backup" and reasons[newest.id] == "newest backup"
    lonely = MemoryStorage()
    only = backup(lonely, 400)
    assert prune(settings, now=NOW, storage=lonely).deleted == [] and present(lonely, only)


def test_prune_keeps_the_newest_snapshots_with_every_file(settings: Settings, storage: MemoryStorage) -> None:
    snaps = [backup(storage, 7 * week, kind="snapshot", verified=True, size=100) for week in range(5)]
    daily = backup(storage, 20, verified=True)  # dumps and snapshots are planned apart
    report = prune(settings, now=NOW, storage=storage)
    assert set(report.deleted) == {snaps[3].id, snaps[4].id}
    assert report.freed_bytes == 200
    assert [present(storage, m) for m in snaps] == [True, True, True, False, False]
    assert present(storage, daily)
    assert {o.key for o in storage.list()} == {k for m in [*snaps[:3], daily] for k in keys_of(m)}


def test_prune_deletes_data_before_the_manifest(settings: Settings) -> None:
    deleted: list[str] = []

    class Recording(MemoryStorage):
        def delete(self, key: str) -> None:
            deleted.append(key)
            super().delete(key)

    storage = Recording()
    snap_old = backup(storage, 30, kind="snapshot")
    backup(storage, 1, kind="snapshot")
    dump_old = backup(storage, 30)
    backup(storage, 0)
    prune(replace(settings, keep_weekly=1), now=NOW, storage=storage)
    for manifest in (snap_old, dump_old):
        mine = [key for key in deleted if key.startswith(manifest.id)]
        assert sorted(mine) == sorted(keys_of(manifest))
        assert mine[-1] == manifest.key  # the manifest goes last: an interruption leaves no unlisted data


def test_prune_survives_an_interruption_and_finishes_next_time(settings: Settings) -> None:
    class Failing(MemoryStorage):
        armed = True

        def delete(self, key: str) -> None:
            if self.armed and key.endswith(".manifest.json"):
                raise StorageError("connection lost")
            super().delete(key)

    storage = Failing()
    old, kept = backup(storage, 30), backup(storage, 0)
    with pytest.raises(StorageError):
        prune(settings, now=NOW, storage=storage)
    assert storage.exists(old.key) and not storage.exists(old.path)  # a manifest without data, never the reverse
    storage.armed = False
    assert prune(settings, now=NOW, storage=storage).deleted == [old.id]
    assert not storage.exists(old.key) and present(storage, kept)


def test_prune_expires_wal_only_before_the_oldest_kept_snapshot(settings: Settings, storage: MemoryStorage) -> None:
    archive = settings.wal_archive
    names = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"]
    for name in names:
        (archive / name[:16]).mkdir(parents=True, exist_ok=True)
        (archive / name[:16] / f"{name}.zst").write_bytes(b"w" * 7)
    (archive / "history").mkdir()
    (archive / "history" / "00000002.history.zst").write_bytes(b"h")
    backup(storage, 21, kind="snapshot", start_segment="000000010000000000000001")
    for week in range(3):
        backup(storage, 7 * week, kind="snapshot", start_segment="000000010000000000000002")
    preview = prune(settings, dry_run=True, now=NOW, storage=storage)
    assert preview.wal_deleted == ["000000010000000000000001"] and preview.wal_freed_bytes == 7
    assert (archive / "0000000100000000" / "000000010000000000000001.zst").exists()
    report = prune(settings, now=NOW, storage=storage)
    assert report.wal_deleted == ["000000010000000000000001"]
    assert sorted(p.name for p in archive.rglob("*.zst")) == [
        "000000010000000000000002.zst", "000000010000000000000003.zst", "00000002.history.zst"]


def test_a_snapshot_the_lock_still_holds_keeps_its_wal(settings: Settings) -> None:
    written = [NOW]
    storage = MemoryStorage("vault", lock=ObjectLock(days=30), clock=lambda: written[0])
    archive = settings.wal_archive
    for name in ("000000010000000000000001", "000000010000000000000002"):
        (archive / name[:16]).mkdir(parents=True, exist_ok=True)
        (archive / name[:16] / f"{name}.zst").write_bytes(b"w")
    written[0] = NOW - timedelta(days=21)
    held = backup(storage, 21, kind="snapshot", start_segment="000000010000000000000001")
    for week in range(3):
        written[0] = NOW - timedelta(days=7 * week)
        backup(storage, 7 * week, kind="snapshot", start_segment="000000010000000000000002")
    report = prune(settings, now=NOW, storage=storage)
    # Expired, but locked for nine more days: it stays restorable, so the WAL it starts from stays too.
    assert [entry.backup_id for entry in report.locked] == [held.id] and report.wal_deleted == []
    assert (archive / "0000000100000000" / "000000010000000000000001.zst").exists()


# --- health ------------------------------------------------------------------------------------------

def problems(settings: Settings, storage: MemoryStorage) -> list[str]:
    report = check_health(settings, now=NOW, storage=storage)
    assert report.ok == (not report.problems)
    return report.problems


def test_health_of_a_recent_verified_backup(settings: Settings, storage: MemoryStorage) -> None:
    assert problems(settings, storage) == ["no backup found in the catalog"]
    backup(storage, 3, verified=True)
    newest = backup(storage, 0.2, verified=True)
    report = check_health(settings, now=NOW, storage=storage)
    assert report.ok and report.newest_backup == newest.id and report.verified is True


@pytest.mark.parametrize(("case", "expected"), [
    ("stale", "hours old"),
    ("empty", "empty (0 bytes)"),
    ("missing", "is missing"),
    ("truncated", "its manifest says 10"),
    ("never verified", "has never been verified"),
    ("failed", "failed verification: row counts differ"),
])
def test_health_names_each_problem(settings: Settings, storage: MemoryStorage, case: str, expected: str) -> None:
    backup(storage, 5, verified=True)  # an older good backup does not hide a bad newest one
    if case == "stale":
        newest = backup(storage, 2, verified=True)
    elif case == "empty":
        newest = backup(storage, 0.2, verified=True, size=0)
    elif case == "truncated":
        newest = backup(storage, 0.2, verified=True, stored=4)
    elif case == "never verified":
        newest = backup(storage, 0.5)
    elif case == "failed":
        newest = backup(storage, 0.2, verified=False)
    else:
        newest = backup(storage, 0.2, verified=True)
        storage.delete(newest.path)
    found = problems(settings, storage)
    assert len(found) == 1 and expected in found[0] and newest.id in found[0]


def test_a_dump_still_in_its_verify_window_is_healthy(settings: Settings, storage: MemoryStorage) -> None:
    backup(storage, 0.05)  # 72 minutes old, not verified yet
    assert problems(settings, storage) == []
