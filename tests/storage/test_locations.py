"""Two locations as one: a local directory plus a bucket (or two directories), written together, read with fallback."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, BucketMissing, ConfigError, ObjectMissing
from backup_tasks.settings import Settings
from backup_tasks.storage.integrity import (
    HashingWriter,
    check_locations,
    first_good,
    holders,
    listing_by_location,
    probe_all,
    read_first_good,
    summarize,
)
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.locations import open_locations
from backup_tasks.storage.mirrored import MirroredStorage
from backup_tasks.storage.s3 import MIB, S3Options, S3Storage
from tests.support.data import random_chunks
from tests.support.postgres import url_of
from tests.support.s3 import S3Server


@pytest.fixture
def mirrored(tmp_path: Path, bucket_url: str) -> MirroredStorage:
    bucket = S3Storage.from_url(bucket_url, S3Options(part_size=5 * MIB))
    return MirroredStorage(LocalStorage(tmp_path / "local"), bucket)


def write(storage: MirroredStorage | LocalStorage, key: str, total: int) -> tuple[int, str]:
    writer = HashingWriter(storage.writer(key))
    for chunk in random_chunks(total):
        writer.write(chunk)
    writer.commit()
    return writer.bytes_written, writer.hexdigest()


def flip_local(storage: LocalStorage, key: str) -> None:
    path = storage.root / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# --- settings ---------------------------------------------------------------------------------------

def test_copy_to_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({"BACKUP_DIR": str(tmp_path / "a"), "BACKUP_COPY_TO": "s3://offsite/aitrapp/"})
    assert settings.copy_to == "s3://offsite/aitrapp/"
    assert Settings.from_env({"BACKUP_DIR": str(tmp_path / "a")}).copy_to is None
    for bad in (str(tmp_path / "a"), str(tmp_path / "a") + "/", "ftp://host/x", "s3://"):
        with pytest.raises(ConfigError) as raised:
            Settings.from_env({"BACKUP_DIR": str(tmp_path / "a"), "BACKUP_COPY_TO": bad})
        assert raised.value.exit_code == 2
    with pytest.raises(ConfigError, match="same location"):
        Settings.from_env({"BACKUP_DIR": "s3://bkt/p", "BACKUP_COPY_TO": "s3://bkt/p/"})
    assert isinstance(open_locations(str(tmp_path / "a")), LocalStorage)
    both = open_locations(str(tmp_path / "a"), str(tmp_path / "b"))
    assert isinstance(both, MirroredStorage) and both.copy.location == str(tmp_path / "b")


# --- writing to both ----------------------------------------------------------------------------------

def test_every_object_lands_in_both_locations(mirrored: MirroredStorage) -> None:
    size, digest = write(mirrored, "aitrapp-dump-1.dump.zst", 11 * MIB)  # multipart in the bucket
    mirrored.put_bytes("aitrapp-dump-1.manifest.json", b"{}")
    for member in mirrored.members:
        assert [o.key for o in member.list()] == ["aitrapp-dump-1.dump.zst", "aitrapp-dump-1.manifest.json"]
        with member.open("aitrapp-dump-1.dump.zst") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest
    assert holders(mirrored.members, "aitrapp-dump-1.dump.zst") == [m.location for m in mirrored.members]
    assert listing_by_location(mirrored)["aitrapp-dump-1.manifest.json"] == [m.location for m in mirrored.members]
    assert [o.key for o in mirrored.list()] == ["aitrapp-dump-1.dump.zst", "aitrapp-dump-1.manifest.json"]
    mirrored.delete("aitrapp-dump-1.dump.zst")
    assert all(not m.exists("aitrapp-dump-1.dump.zst") for m in mirrored.members)
    assert size == 11 * MIB


def test_an_aborted_write_leaves_nothing_anywhere(mirrored: MirroredStorage) -> None:
    writer = mirrored.writer("x.dump.zst")
    for chunk in random_chunks(7 * MIB):
        writer.write(chunk)
    writer.abort()
    assert mirrored.list() == []
    assert list(mirrored.primary.root.iterdir()) == []  # type: ignore[attr-defined]  # no partial file either
    assert mirrored.copy.unfinished_uploads() == []  # type: ignore[attr-defined]


def test_when_the_copy_cannot_be_written_neither_location_keeps_it(tmp_path: Path, s3_env: S3Server) -> None:
    broken = MirroredStorage(LocalStorage(tmp_path / "local"), S3Storage.from_url("s3://bt-test-no-such-bucket/x"))
    with pytest.raises(BucketMissing):
        write(broken, "x.dump.zst", 2 * MIB)
    assert broken.primary.list() == [] and list((tmp_path / "local").iterdir()) == []


# --- reading with fallback ------------------------------------------------------------------------------

def test_reads_fall_back_to_the_copy_when_the_primary_lost_the_object(mirrored: MirroredStorage) -> None:
    mirrored.put_bytes("m.manifest.json", b'{"id": "m"}')
    mirrored.primary.delete("m.manifest.json")
    assert mirrored.exists("m.manifest.json")
    assert mirrored.read_bytes("m.manifest.json") == b'{"id": "m"}'
    mirrored.copy.delete("m.manifest.json")
    with pytest.raises(Exception, match="missing"):
        mirrored.read_bytes("m.manifest.json")


def test_a_damaged_primary_is_reported_and_the_copy_is_used(mirrored: MirroredStorage) -> None:
    size, digest = write(mirrored, "d.dump.zst", 3 * MIB)
    flip_local(mirrored.primary, "d.dump.zst")  # type: ignore[arg-type]
    checks = check_locations(mirrored, "d.dump.zst", size=size, sha256=digest)
    assert [c.state for c in checks] == ["damaged", "ok"]
    line = summarize(checks)
    assert "fails its checksum" in line and f"still good in {mirrored.copy.location}" in line
    chosen, seen = first_good(mirrored, "d.dump.zst", size=size, sha256=digest)
    assert chosen is mirrored.copy and [c.ok for c in seen] == [False, True]
    with chosen.open("d.dump.zst") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == digest


def test_no_good_copy_anywhere(mirrored: MirroredStorage) -> None:
    size, digest = write(mirrored, "d.dump.zst", MIB)
    flip_local(mirrored.primary, "d.dump.zst")  # type: ignore[arg-type]
    mirrored.copy.put_bytes("d.dump.zst", b"truncated")
    with pytest.raises(BackupCorrupt, match="no location holds a good copy"):
        first_good(mirrored, "d.dump.zst", size=size, sha256=digest)
    mirrored.delete("d.dump.zst")
    with pytest.raises(ObjectMissing, match="missing from every location"):
        first_good(mirrored, "d.dump.zst", size=size, sha256=digest)
    assert [c.state for c in check_locations(mirrored, "d.dump.zst", size=size, sha256=digest)] == ["missing"] * 2


def test_wal_segments_come_from_the_first_good_location(mirrored: MirroredStorage) -> None:
    segment = b"".join(random_chunks(MIB))
    mirrored.put_bytes("wal/000000010000000000000003", segment)
    digest = hashlib.sha256(segment).hexdigest()
    flip_local(mirrored.primary, "wal/000000010000000000000003")  # type: ignore[arg-type]
    assert read_first_good(mirrored, "wal/000000010000000000000003", size=len(segment), sha256=digest) == segment
    mirrored.primary.delete("wal/000000010000000000000003")
    assert read_first_good(mirrored, "wal/000000010000000000000003", size=len(segment), sha256=digest) == segment


def test_two_local_directories_work_the_same(tmp_path: Path) -> None:
    both = MirroredStorage(LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b"))
    size, digest = write(both, "k", 2 * MIB)
    flip_local(both.copy, "k")  # type: ignore[arg-type]
    assert [c.state for c in check_locations(both, "k", size=size, sha256=digest)] == ["ok", "damaged"]


# --- check ------------------------------------------------------------------------------------------------

def test_probe_reports_each_location(mirrored: MirroredStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    statuses = probe_all(mirrored)
    assert [(s.role, s.reachable, s.writable) for s in statuses] == [("primary", True, True), ("copy", True, True)]
    assert mirrored.list() == []  # the probe cleaned up after itself
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "NotTheRightSecretNotTheRightSecret123456")
    bad = S3Storage.from_url(mirrored.copy.location)
    status = probe_all(MirroredStorage(mirrored.primary, bad))[1]
    assert (status.reachable, status.writable, status.error_type) == (False, False, "StorageAuthFailed")
    assert "NotTheRightSecret" not in (status.error or "")


# --- the existing daily dump, pointed at a bucket -------------------------------------------------------

@pytest.mark.slow
def test_dump_and_restore_through_a_bucket(bucket_url: str, trading_db: ConnInfo,
                                           make_database: Callable[..., ConnInfo],
                                           settings_for: Callable[..., Settings]) -> None:
    from backup_tasks.logical.dump import run_dump
    from backup_tasks.logical.restore import check_checksum, restore_backup
    from backup_tasks.storage.locations import open_storage

    settings = settings_for(trading_db, backup_dir=bucket_url)
    manifest, skipped = run_dump(settings)
    assert not skipped
    storage = open_storage(bucket_url)
    assert isinstance(storage, S3Storage)
    assert [m.id for m in catalog.catalog(storage)] == [manifest.id]
    assert storage.size(manifest.path) == manifest.size_bytes
    check_checksum(storage, manifest)
    target = make_database()
    result = restore_backup(settings, manifest.id, url_of(target), no_owner=True)
    assert result.ok and result.rows == sum(manifest.tables.values()) > 0
