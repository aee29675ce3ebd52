"""Twelve weeks of a trading server: catalog reads cost the backups, prune deletes in batches.

A synthetic catalog (84 daily dumps, 14 weekly snapshots: 12 kept, 2 expiring) beside a WAL archive
of thousands of tiny segment objects. Prune must delete exactly what its dry run reported, through
``delete_many`` (never key by key), quickly; catalog reads (``list``, ``health``, ``verify``'s newest,
``existing_for_day``, prune's plan) must never list the WAL archive recursively, in a directory or
in an S3 copy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.prune import prune
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.errors import StorageError
from backup_tasks.observe.health import check_health
from backup_tasks.settings import Settings
from backup_tasks.storage.base import ObjectInfo, Storage
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.storage.mirrored import MirroredStorage
from backup_tasks.storage.objectlock import ObjectLock
from backup_tasks.wal.index import INDEX_FILE
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import position, segment_name

NOW = datetime(2026, 11, 27, 2, 5, tzinfo=UTC)
SEGMENT_SIZE = 16 << 20
SEGMENTS = 20_000
#: Where the third-oldest snapshot (the oldest of the 12 kept) starts: WAL before it expires.
FIRST_KEPT = 4_000


def snapshot_starts(segments: int, first_kept: int) -> list[int]:
    return [0, first_kept // 2] + [first_kept + j * (segments - first_kept) // 12 for j in range(12)]


def build_catalog(storage: Storage, segments: int = SEGMENTS, first_kept: int = FIRST_KEPT) -> list[Manifest]:
    """84 daily dumps and 14 weekly snapshots (manifests and tiny data objects), oldest first."""
    manifests = []
    for day in range(84):
        started = NOW - timedelta(days=83 - day, hours=1)
        backup_id = f"trading-dump-{started:%Y%m%dT%H%M%SZ}"
        manifests.append(Manifest(
            id=backup_id, kind="dump", database="trading", server="db:5432", server_version="16.4",
            started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=4)),
            path=f"{backup_id}.dump.zst", size_bytes=5, sha256="0" * 64, compression="zstd",
            trading_day=started.date().isoformat()))
    for k, start in enumerate(snapshot_starts(segments, first_kept)):
        started = NOW - timedelta(days=7 * (13 - k), hours=2)
        backup_id = f"trading-snapshot-{started:%Y%m%dT%H%M%SZ}"
        files = {f"{backup_id}.{part}": {"size": 4, "sha256": "0" * 64, "role": part}
                 for part in ("base.tar.zst", "pg_wal.tar.zst", "backup_manifest", "config.json")}
        manifests.append(Manifest(
            id=backup_id, kind="snapshot", database="trading", server="db:5432", server_version="16.4",
            started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=9)),
            path=f"{backup_id}.base.tar.zst", size_bytes=16, sha256="0" * 64, compression="zstd", files=files,
            timeline=1, wal_segment_size=SEGMENT_SIZE, start_segment=segment_name(1, start, SEGMENT_SIZE),
            stop_segment=segment_name(1, start + 1, SEGMENT_SIZE)))
    for m in manifests:
        for key in m.files or [m.path]:
            storage.put_bytes(key, b"data")
        catalog.save_new(storage, m)
    return manifests


def wal_keys(segments: int = SEGMENTS) -> list[str]:
    return [object_key(segment_name(1, n, SEGMENT_SIZE)) for n in range(segments)]


def build_archive(root: Path, segments: int = SEGMENTS) -> list[str]:
    keys = wal_keys(segments)
    for directory in {key.split("/")[0] for key in keys}:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for key in keys:
        (root / key).write_bytes(b"w")
    (root / "history").mkdir()
    (root / "history" / "00000002.history.zst").write_bytes(b"h")
    return keys


def archived(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.zst")}


class Watched:
    """A storage seen through a recorder: every ``list`` and ``delete_many`` call; a per-key ``delete`` fails."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.location = inner.location
        self.lists: list[tuple[str, bool]] = []
        self.batches: list[int] = []

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        self.lists.append((prefix, recursive))
        assert not recursive, f"a catalog read listed {prefix or 'the location'} recursively (the WAL archive too)"
        return self.inner.list(prefix, recursive=recursive)

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(keys)
        self.batches.append(len(wanted))
        return self.inner.delete_many(wanted)

    def delete(self, key: str) -> None:
        raise AssertionError(f"prune deleted {key} on its own, not in a batch")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # File locks (no Redis); the WAL archive is <backup_dir>/wal, the default.
    return Settings(backup_dir=str(tmp_path / "backups"), broker_url="memory://", keep_daily_days=7, keep_weekly=12)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["memory", "local"])
def test_prune_of_twelve_weeks_deletes_exactly_what_the_dry_run_said_in_batches(
        settings: Settings, tmp_path: Path, driver: str) -> None:
    inner: Storage = MemoryStorage("catalog") if driver == "memory" else LocalStorage(tmp_path / "backups")
    manifests = build_catalog(inner)
    keys = build_archive(settings.wal_archive)
    storage = Watched(inner)

    started = time.monotonic()
    dry = prune(settings, dry_run=True, now=NOW, storage=storage)  # type: ignore[arg-type]
    dry_seconds = time.monotonic() - started
    assert storage.batches == [] and len(keys) == len(archived(settings.wal_archive)) - 1, "a dry run deletes nothing"
    expired_ids = {m.id for m in manifests[:77]} | {m.id for m in manifests[84:86]}
    assert set(dry.deleted) == expired_ids
    assert dry.wal_deleted == [segment_name(1, n, SEGMENT_SIZE) for n in range(FIRST_KEPT)]
    assert dry.wal_freed_bytes == FIRST_KEPT

    started = time.monotonic()
    real = prune(settings, now=NOW, storage=storage)  # type: ignore[arg-type]
    seconds = time.monotonic() - started
    assert (real.deleted, real.wal_deleted, real.freed_bytes) == (dry.deleted, dry.wal_deleted, dry.freed_bytes)
    # Two batches: every data object of the 79 expired backups, then their manifests.
    assert storage.batches == [77 + 2 * 4, 79]
    kept = [m for m in manifests if m.id not in expired_ids]
    assert {o.key for o in inner.list(recursive=False)} == {k for m in kept for k in [*(m.files or [m.path]), m.key]}
    assert archived(settings.wal_archive) == set(keys[FIRST_KEPT:]) | {"history/00000002.history.zst"}
    assert dry_seconds < 5 and seconds < 10, (dry_seconds, seconds)  # ~0.1 s and ~0.3 s on a quiet machine
    assert prune(settings, now=NOW, storage=storage).deleted == []  # type: ignore[arg-type]


@pytest.mark.slow
def test_wal_expiry_deletes_from_the_copy_in_batches_too(settings: Settings, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    copy_root = tmp_path / "copy"
    settings = replace(settings, copy_to=str(copy_root))
    storage = MemoryStorage("catalog")
    build_catalog(storage)
    keys = build_archive(settings.wal_archive)
    build_archive(copy_root / "wal")
    batches: list[int] = []
    original = LocalStorage.delete_many

    def counted(self: LocalStorage, keys: Iterable[str]) -> dict[str, StorageError]:
        wanted = list(keys)
        if self.root == copy_root / "wal":  # the copy's batches (the archive's own follow each of them)
            batches.append(len(wanted))
        return original(self, wanted)

    monkeypatch.setattr(LocalStorage, "delete_many", counted)
    report = prune(settings, now=NOW, storage=storage)
    assert len(report.wal_deleted) == FIRST_KEPT and batches == [1000] * (FIRST_KEPT // 1000)
    assert archived(settings.wal_archive) == archived(copy_root / "wal") == (
        set(keys[FIRST_KEPT:]) | {"history/00000002.history.zst"})


def _put_many(put: Any, keys: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))


@pytest.mark.slow
def test_wal_expiry_in_an_s3_copy_is_a_few_delete_objects_requests(
        settings: Settings, bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tasks.storage.s3 import S3Storage

    segments, expired = 2_150, 2_100
    settings = replace(settings, copy_to=bucket_url)
    storage = MemoryStorage("catalog")
    build_catalog(storage, segments, expired)
    keys = build_archive(settings.wal_archive, segments)
    copy = S3Storage.from_url(f"{bucket_url}/wal")
    _put_many(lambda key: copy.put_bytes(key, b"w"), keys)
    requests: list[int] = []
    original = S3Storage._delete_batch

    def counted(self: S3Storage, batch: dict[str, str], failures: dict[str, StorageError]) -> None:
        requests.append(len(batch))
        original(self, batch, failures)

    monkeypatch.setattr(S3Storage, "_delete_batch", counted)
    report = prune(settings, now=NOW, storage=storage)
    assert len(report.wal_deleted) == expired and requests == [1000, 1000, 100]
    assert {o.key for o in copy.list("")} == set(keys[expired:])


@pytest.mark.slow
def test_wal_locked_in_the_copy_is_reported_and_kept_here_until_its_lock_ends(
        settings: Settings, locked_bucket_url: str, tmp_path: Path) -> None:
    from backup_tasks.storage.locations import open_storage

    segments, expired = 40, 30
    settings = replace(settings, copy_to=locked_bucket_url, object_lock=ObjectLock(days=1))
    storage = MemoryStorage("catalog")
    build_catalog(storage, segments, expired)
    keys = build_archive(settings.wal_archive, segments)
    copy = open_storage(f"{locked_bucket_url}/wal")  # BACKUP_OBJECT_LOCK_DAYS=1 (the fixture): every put locked
    _put_many(lambda key: copy.put_bytes(key, b"w"), keys)
    # Archived just now: the copy's lock is known to hold (from each file's mtime), nothing is attempted.
    report = prune(settings, now=NOW + timedelta(days=3), storage=storage)
    assert report.wal_deleted == [] and report.wal_locked == expired
    assert archived(settings.wal_archive) >= set(keys) and {o.key for o in copy.list("")} == set(keys)
    # Files that look old enough (a lock the mtimes do not foresee): prune tries, S3 refuses each with its
    # date, and they stay here too, so the next run finds them again.
    old = (NOW - timedelta(days=3)).timestamp()
    for key in keys:
        os.utime(settings.wal_archive / key, (old, old))
    report = prune(settings, now=NOW + timedelta(days=3), storage=storage)
    assert report.wal_deleted == [] and report.wal_locked == expired
    assert parse_time(str(report.wal_locked_until)) > datetime.now(UTC)
    assert archived(settings.wal_archive) >= set(keys) and {o.key for o in copy.list("")} == set(keys)


@pytest.mark.slow
def test_catalog_reads_never_list_the_wal_archive(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tasks.cli import daily
    from backup_tasks.storage import locations
    from backup_tasks.wal.contents import ArchiveContents

    inner = LocalStorage(Path(settings.backup_dir))
    manifests = build_catalog(inner, 3_000)
    build_archive(settings.wal_archive, 3_000)
    storage = Watched(inner)

    assert len(catalog.catalog(storage)) == 98  # type: ignore[arg-type]
    assert catalog.newest(storage).id == manifests[83].id  # type: ignore[arg-type]  (verify's "newest")
    assert catalog.existing_for_day(storage, "trading", str(manifests[83].trading_day)) is not None  # type: ignore[arg-type]
    assert check_health(settings, now=NOW, storage=storage).newest_backup == manifests[83].id  # type: ignore[arg-type]
    prune(settings, dry_run=True, now=NOW, storage=storage)  # type: ignore[arg-type]
    # (and ``generations/``: the records of the PostgreSQL systems the catalog held, one small directory)
    assert storage.lists and all(prefix in ("", "generations/") and not recursive
                                 for prefix, recursive in storage.lists)

    # `list` (with its restorable ranges): the catalog at the top level, the local archive's index read once.
    monkeypatch.setattr(locations, "open_locations", lambda *_args, **_kw: storage)
    passes: list[int] = []
    original = ArchiveContents.index

    def index(self: ArchiveContents, **kwargs: Any) -> Any:
        passes.append(1)
        return original(self, **kwargs)

    monkeypatch.setattr(ArchiveContents, "index", index)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert daily.cmd_list(argparse.Namespace(json=True), settings) == 0
    document = json.loads(out.getvalue())
    assert len(document["backups"]) == 98 and passes == [1]
    assert all(not recursive for _prefix, recursive in storage.lists)


@pytest.mark.slow
def test_catalog_reads_of_an_s3_copy_are_one_request_whatever_its_wal(
        tmp_path: Path, bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tasks.storage.s3 import S3Storage

    copy = S3Storage.from_url(bucket_url)
    storage = MirroredStorage(LocalStorage(tmp_path / "backups"), copy)
    build_catalog(storage, 100)
    _put_many(lambda key: copy.put_bytes(f"wal/{key}", b"w"), wal_keys(1_100))  # two pages if listed
    pages: list[str] = []
    copy.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: pages.append("list"))
    assert len(catalog.catalog(storage)) == 98
    assert pages == ["list"]


@pytest.mark.slow
def test_the_dry_run_reports_the_archive_as_it_is_not_as_it_was_indexed(settings: Settings) -> None:
    """The index caches each directory's names and size; a change since (a file added, one gone) is reported."""
    storage = MemoryStorage("catalog")
    build_catalog(storage, 3_000, 600)  # WAL before segment 600 (log id 2, segment 0x58) expires
    root = settings.wal_archive
    keys = build_archive(root, 3_000)
    for i, key in enumerate(keys[:700]):
        (root / key).write_bytes(b"w" * (1 + i % 7))  # sizes differ: the freed bytes are checked file by file
    past = time.time() - 3600
    for directory in root.iterdir():
        os.utime(directory, (past, past))  # nobody wrote there lately: the index caches them

    def expected() -> tuple[list[str], int]:
        limit = position(segment_name(1, 600, SEGMENT_SIZE))
        names = sorted(p.name[:-4] for p in root.glob("[0-9A-F]*/*.zst") if position(p.name) < limit)
        return names, sum((root / object_key(n)).stat().st_size for n in names)

    first = prune(settings, dry_run=True, now=NOW, storage=storage)
    assert (first.wal_deleted, first.wal_freed_bytes) == expected() and len(first.wal_deleted) == 600
    assert (root / INDEX_FILE).is_file()

    (root / keys[5]).unlink()
    (root / f"{keys[300]}.new").write_bytes(b"w" * 100)  # replaced by another file, as wal-push would (never
    os.replace(root / f"{keys[300]}.new", root / keys[300])  # in place: sizes are trusted while the directory is)
    (root / "0000000100000000" / f"{segment_name(1, 9, SEGMENT_SIZE)}.00000028.backup.zst").write_bytes(b"b" * 13)
    (root / "0000000100000002" / f"{segment_name(1, 520, SEGMENT_SIZE)}.partial.zst").write_bytes(b"p" * 17)
    (root / "0000000100000002" / f"{segment_name(1, 610, SEGMENT_SIZE)}.partial.zst").write_bytes(b"p" * 19)
    second = prune(settings, dry_run=True, now=NOW, storage=storage)
    assert (second.wal_deleted, second.wal_freed_bytes) == expected() and len(second.wal_deleted) == 601

    real = prune(settings, now=NOW, storage=storage)
    assert (real.wal_deleted, real.wal_freed_bytes) == (second.wal_deleted, second.wal_freed_bytes)
    assert expected() == ([], 0)
    assert prune(settings, dry_run=True, now=NOW, storage=storage).wal_deleted == []
