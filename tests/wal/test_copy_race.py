"""wal-push into BACKUP_COPY_TO without an overwrite race (fault matrix: two pushers, one segment).

Two pushers of the same segment name (two servers wrongly sharing an archive, or a retry beside a
slow first attempt) must never overwrite each other in the copy location. The race is injected in
process: the copy location is wrapped so that another pusher's object lands there right after this
pusher has looked and before it writes, which is exactly where a check-then-write loses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.errors import WalConflict
from backup_tasks.storage.base import Storage
from backup_tasks.storage.files import WAL_MODES
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.objects import TRAILER_SIZE

SEGMENT = "000000010000000000000007"


class RivalArrives:
    """The copy location, where another pusher's object for ``key`` lands between this pusher's look and write."""

    def __init__(self, inner: Storage, key: str, rival: bytes) -> None:
        self.inner = inner
        self.key = key
        self.rival = rival
        self.location = inner.location
        self.arrived = False

    def _arrive(self) -> None:
        if not self.arrived:
            self.arrived = True
            self.inner.put_bytes(self.key, self.rival)

    def exists(self, key: str) -> bool:
        found = self.inner.exists(key)
        self._arrive()  # just after the check
        return found

    def put_new(self, key: str, data: bytes) -> bool:
        self._arrive()  # just before the write
        return self.inner.put_new(key, data)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._arrive()
        self.inner.put_bytes(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def segment_file(directory: Path, seed: int, name: str = SEGMENT) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    block = hashlib.sha256(str(seed).encode()).digest() * 64
    path.write_bytes((block * 64).ljust(1 << 20, b"\0"))
    return path


def archived_object(tmp_path: Path, label: str, source: Path) -> bytes:
    """What a pusher with its own local archive stores for ``source``."""
    archive = WalArchive.in_directory(tmp_path / label)
    archive.ensure()
    archive.push(source)
    return archive.path_for(source.name).read_bytes()


@pytest.fixture
def copy(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "copy" / "wal")


def pusher(tmp_path: Path, copy: Storage | RivalArrives) -> WalArchive:
    """A local archive copied to ``copy``: the same ``WalArchive`` over any pair of locations."""
    archive = WalArchive(LocalStorage(tmp_path / "archive", modes=WAL_MODES), copy)  # type: ignore[arg-type]
    archive.ensure()
    return archive


def test_a_rival_with_different_content_is_a_conflict_and_stays_untouched(
        tmp_path: Path, copy: LocalStorage) -> None:
    rival = archived_object(tmp_path, "rival", segment_file(tmp_path / "rival-pg_wal", seed=2))
    racing = RivalArrives(copy, object_key(SEGMENT), rival)
    archive = pusher(tmp_path, racing)
    with pytest.raises(WalConflict, match="DIFFERENT content"):
        archive.push(segment_file(tmp_path / "pg_wal", seed=1))
    assert racing.arrived
    assert copy.read_bytes(object_key(SEGMENT)) == rival  # the other pusher's object was not overwritten
    assert archive.path_for(SEGMENT).read_bytes() != rival


def test_a_rival_with_the_same_content_means_already_archived(
        tmp_path: Path, copy: LocalStorage) -> None:
    source = segment_file(tmp_path / "pg_wal", seed=1)
    same = archived_object(tmp_path, "rival", source)
    racing = RivalArrives(copy, object_key(SEGMENT), same)
    archive = pusher(tmp_path, racing)
    assert archive.push(source).status == "archived"
    assert racing.arrived and copy.read_bytes(object_key(SEGMENT)) == same


def test_a_damaged_rival_object_is_replaced_by_the_good_one(
        tmp_path: Path, copy: LocalStorage) -> None:
    source = segment_file(tmp_path / "pg_wal", seed=1)
    good = archived_object(tmp_path, "reference", source)
    for damaged in (good[:100], good[:-TRAILER_SIZE] + b"\0" * TRAILER_SIZE):
        copy.delete(object_key(SEGMENT))
        racing = RivalArrives(copy, object_key(SEGMENT), damaged)
        archive = pusher(tmp_path / f"run-{len(damaged)}", racing)
        archive.push(source)
        assert racing.arrived and copy.read_bytes(object_key(SEGMENT)) == good


def test_a_second_host_pushing_other_content_into_the_shared_copy_is_refused(tmp_path: Path) -> None:
    shared = MemoryStorage("offsite")
    first = pusher(tmp_path / "host-a", shared)
    first.push(segment_file(tmp_path / "a-pg_wal", seed=1))
    stored = shared.read_bytes(object_key(SEGMENT))
    second = pusher(tmp_path / "host-b", shared)
    with pytest.raises(WalConflict):
        second.push(segment_file(tmp_path / "b-pg_wal", seed=2))
    assert shared.read_bytes(object_key(SEGMENT)) == stored
    assert first.push(segment_file(tmp_path / "a-pg_wal", seed=1)).status == "already-archived"
