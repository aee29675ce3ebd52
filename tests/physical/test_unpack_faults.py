"""A local failure is not a corrupt backup: unpacking a snapshot onto a full (or failing) local disk.

The snapshot is intact; the disk it is unpacked onto is not. That must come out as ``StorageFull`` /
``StorageError`` with advice, never as ``BackupCorrupt``, never as a failed verification recorded in
the snapshot's manifest, and never as a reason to fall back to ``BACKUP_COPY_TO`` and blame it. A
genuinely damaged object is still ``BackupCorrupt``, whatever tar said: the whole object is hashed.

The full disk is a 1 MiB tmpfs (mounting needs root: those tests skip without it); tar dying early is
a fake ``tar`` first on PATH.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import BackupCorrupt, RestoreFailed, StorageError, StorageFull
from backup_tasks.physical import verify as verify_module
from backup_tasks.physical.drill import pitr_drill
from backup_tasks.physical.unpack import unpack_snapshot, unpack_with_fallback
from backup_tasks.physical.verify import verify_snapshot
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.locations import open_locations
from tests.support.data import base_tar, store_snapshot
from tests.support.pitr import Scenario, cli_env, run_cli
from tests.support.require import unavailable


def damage(backup_dir: Path, manifest: Manifest) -> None:
    """Flip one byte in the middle of the stored base object: the catalog's sha256 no longer matches."""
    path = backup_dir / manifest.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 1 MiB tmpfs: a real local disk that fills up (ENOSPC) long before any snapshot fits."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="bt-test-full-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0711", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        mount_point.rmdir()
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip()}",
                    "run the tests as root on a machine that allows mounts")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)
        mount_point.rmdir()


FAKE_TAR = """#!/bin/sh
# Reads a little of the archive, then fails the way GNU tar does when it cannot go on writing.
head -c 65536 >/dev/null
echo "tar: base/000000000001: Cannot write: No space left on device" >&2
echo "tar: Error is not recoverable: exiting now" >&2
exit 2
"""


@pytest.fixture
def tar_dies_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tar`` (found on PATH) stops reading after 64 KiB, reporting a full disk: the pipe breaks under us."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "tar").write_text(FAKE_TAR)
    (bin_dir / "tar").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


# --- unpack_snapshot / unpack_with_fallback ------------------------------------------------------------

def test_a_full_local_disk_is_storage_full_not_a_corrupt_backup(small_disk: Path, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=60, file_size=40_000))  # ~2.4 MB onto 1 MiB
    with pytest.raises(StorageFull) as caught:
        unpack_snapshot(LocalStorage(backup_dir), snapshot, small_disk / "data")
    message = str(caught.value)
    assert "No space left on device" in message and "free space" in message, message
    assert "\n" not in message, "one line"
    assert "sha256 matches" in message, "it says the backup itself is intact"


def test_tar_stopping_early_on_a_local_error_is_judged_on_the_whole_object(
        tar_dies_early: None, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=30, file_size=40_000))
    with pytest.raises(StorageFull, match="No space left on device"):
        unpack_snapshot(LocalStorage(backup_dir), snapshot, tmp_path / "data")
    # The same failure of tar with a damaged object: the object is read to its end, so the damage shows.
    damage(backup_dir, snapshot)
    with pytest.raises(BackupCorrupt) as caught:
        unpack_snapshot(LocalStorage(backup_dir), snapshot, tmp_path / "data-2")
    assert f"{snapshot.size_bytes} bytes with sha256" in str(caught.value), "hashed to the end, not '0 bytes'"


def test_a_full_local_disk_does_not_fall_back_to_the_copy_or_blame_it(
        small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    primary, copy = tmp_path / "backups", tmp_path / "copy"
    snapshot = store_snapshot(primary, base_tar(files=60, file_size=40_000))
    shutil.copytree(primary, copy)
    storage = open_locations(str(primary), str(copy))
    copy_location = storage.members[1]  # type: ignore[attr-defined]
    opened: list[str] = []
    real_open = copy_location.open

    def spy(key: str):  # type: ignore[no-untyped-def]
        opened.append(key)
        return real_open(key)

    monkeypatch.setattr(copy_location, "open", spy)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageFull):
        unpack_with_fallback(storage, snapshot, small_disk / "data")
    assert opened == [], "the copy was not read: nothing is wrong with it"
    assert not [r for r in caplog.records if "starting again" in r.getMessage()], caplog.text


def test_a_sound_object_that_is_no_tar_archive_is_still_corrupt(tmp_path: Path) -> None:
    """The sha256 matches (the catalog recorded garbage), tar rejects it: that is the backup's fault."""
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, b"this is not a tar archive\n" * 4000)
    with pytest.raises(BackupCorrupt, match="does not unpack"):
        unpack_snapshot(LocalStorage(backup_dir), snapshot, tmp_path / "data")


@pytest.mark.timeout(120)  # before the fix this hung for ever
def test_thousands_of_failed_files_do_not_hang_the_unpack(small_disk: Path, tmp_path: Path) -> None:
    """tar reports every file it cannot write: far more than a pipe holds. Nobody reading it was a deadlock."""
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=3000, file_size=3_000, name_length=90))
    with pytest.raises(StorageFull):
        unpack_snapshot(LocalStorage(backup_dir), snapshot, small_disk / "data")


# --- verify_snapshot: the local error propagates, nothing is recorded ----------------------------------

def test_verify_snapshot_on_a_full_disk_raises_and_records_no_verdict(
        small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=60, file_size=40_000))
    settings = Settings(backup_dir=str(backup_dir), broker_url="memory://", lock_url=None)
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # TMPDIR, where verify unpacks, is the full disk
    with pytest.raises(StorageFull, match="No space left on device"):
        verify_snapshot(settings)
    recorded = catalog.load(LocalStorage(backup_dir), snapshot.id)
    assert recorded.verification is None, recorded.verification


def test_verify_snapshot_when_tar_fails_locally_records_no_verdict(
        tar_dies_early: None, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=30, file_size=40_000))
    settings = Settings(backup_dir=str(backup_dir), broker_url="memory://", lock_url=None)
    with pytest.raises(StorageError) as caught:
        verify_snapshot(settings, snapshot.id)
    assert not isinstance(caught.value, BackupCorrupt)
    assert catalog.load(LocalStorage(backup_dir), snapshot.id).verification is None


def test_a_restored_copy_failing_on_a_full_disk_records_no_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacked fine, then the throwaway server (or its restore_command) ran out of local disk."""
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=2, file_size=1000))
    settings = Settings(backup_dir=str(backup_dir), broker_url="memory://", lock_url=None)

    @contextmanager
    def full_disk_recovery(*args: Any, **kwargs: Any) -> Iterator[Any]:
        raise RestoreFailed('recovery failed: FATAL:  could not write to file "pg_wal/xlogtemp.71": '
                            'No space left on device')
        yield

    monkeypatch.setattr(verify_module, "restored_cluster", full_disk_recovery)
    with pytest.raises(StorageFull, match="No space left on device"):
        verify_snapshot(settings, snapshot.id)
    assert catalog.load(LocalStorage(backup_dir), snapshot.id).verification is None


# --- the CLI against a real snapshot: exit 1, the error named, nothing recorded ---------------------------

@pytest.mark.slow
def test_a_full_local_disk_is_reported_by_verify_drill_and_restore(
        scenario: Scenario, small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(Path(scenario.settings.backup_dir))
    before = catalog.load(storage, scenario.snapshot.id)
    env = cli_env(scenario.settings, TMPDIR=str(small_disk))
    for command in (["verify", "--snapshot", scenario.snapshot.id],
                    ["restore-pitr", "--data-dir", str(small_disk / "restored")]):
        result = run_cli(*command, "--json", env=env)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        document = json.loads(result.stdout)
        assert document["error_type"] == "StorageFull", (command, document)
        assert "No space left on device" in document["error"] and "free space" in document["error"], document
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (small_disk / "restored").exists() or not any((small_disk / "restored").iterdir())
    # The drill is a worker task (no CLI command): called in-process, unpacking onto the full disk. Only
    # its scratch directory goes there: the drill's planning reads WAL into TMPDIR before any unpack.
    real_mkdtemp = tempfile.mkdtemp

    def scratch_on_full_disk(suffix: str | None = None, prefix: str | None = None, dir: str | None = None) -> str:
        on_disk = str(small_disk) if prefix == "backup-tasks-pitr-" else dir
        return real_mkdtemp(suffix, prefix, on_disk)

    monkeypatch.setattr(tempfile, "mkdtemp", scratch_on_full_disk)
    with pytest.raises(StorageFull):
        pitr_drill(scenario.settings, seed=1)
    after = catalog.load(storage, scenario.snapshot.id)
    assert after.verification == before.verification, "no verdict about the backup was recorded"
    assert after.pitr_drill == before.pitr_drill, "no drill result was recorded"
