"""The storage contract (``backup_tasks.storage.base``), checked the same way against every driver.

memory (the reference driver), local (a directory), s3 (a real moto S3 server) and mirrored (a
directory plus a memory copy). A driver-specific helper only simulates "the writing process was
killed"; every check after that goes through the ``Storage`` interface.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from backup_tasks.errors import ObjectMissing, StorageAuthFailed, StorageError, StorageReadOnly
from backup_tasks.storage.base import PARTIAL_MARK, Features, ObjectWriter, Storage
from backup_tasks.storage.copies import BACKUPS, WAL, CopyPolicy, Mirror, Outcome, Written
from backup_tasks.storage.local import LocalStorage, LocalWriter
from backup_tasks.storage.memory import MemoryStorage, MemoryWriter
from backup_tasks.storage.mirrored import MirroredStorage
from backup_tasks.storage.objectlock import ObjectLock
from backup_tasks.storage.readonly import ReadOnlyStorage
from backup_tasks.storage.s3 import MIB, S3Options, S3Storage, S3Writer
from backup_tasks.storage.s3 import uploads as s3_uploads

DRIVERS = ["memory", "local", "s3", "mirrored"]


@dataclass
class Driver:
    storage: Storage
    #: Enough bytes that an unfinished writer has left something behind (S3: one uploaded part).
    partial_size: int
    kind: str = ""

    def abandon(self, writer: ObjectWriter) -> None:
        """What a killed process leaves: the writer is neither committed nor aborted, and nobody owns it."""
        for inner in (getattr(writer, "primary", None), getattr(writer, "copy", None)):  # a mirrored writer
            if inner is not None:
                self.abandon(inner)
        if isinstance(writer, LocalWriter) and writer._file is not None:
            assert writer._file.file is not None
            writer._file.file.close()  # the kernel drops the writer's flock, as when its process dies
            writer._file = None
        if isinstance(writer, MemoryWriter):
            writer.storage._writers.pop(writer.partial_key, None)  # the writer object is gone
        if isinstance(writer, S3Writer):
            for future in list(writer._pending):
                future.result()
            if writer._pool is not None:
                writer._pool.shutdown(wait=True)
            s3_uploads.LIVE_UPLOADS.discard(str(writer._upload_id))


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    kind = request.param
    if kind == "memory":
        return Driver(MemoryStorage(), 100, kind)
    if kind == "local":
        return Driver(LocalStorage(tmp_path / "backups"), 100, kind)
    if kind == "mirrored":
        return Driver(MirroredStorage(LocalStorage(tmp_path / "primary"), MemoryStorage("copy")), 100, kind)
    bucket_url: str = request.getfixturevalue("bucket_url")
    return Driver(S3Storage.from_url(bucket_url, S3Options(part_size=5 * MIB)), 6 * MIB, kind)


def payload(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def keys(storage: Storage, prefix: str = "", *, recursive: bool = True) -> list[str]:
    return [o.key for o in storage.list(prefix, recursive=recursive)]


# --- writers -----------------------------------------------------------------------------------------

def test_writer_publishes_only_on_commit(driver: Driver) -> None:
    storage = driver.storage
    data = payload(driver.partial_size)
    writer = storage.writer("aitrapp-dump-1.dump.zst")
    writer.write(data[:40])
    writer.write(data[40:])
    assert keys(storage) == []
    assert not storage.exists("aitrapp-dump-1.dump.zst")
    with pytest.raises(ObjectMissing):
        storage.read_bytes("aitrapp-dump-1.dump.zst")
    writer.commit()
    assert keys(storage) == ["aitrapp-dump-1.dump.zst"]
    assert storage.list()[0].size == len(data) and storage.list()[0].mtime > time.time() - 300
    assert storage.read_bytes("aitrapp-dump-1.dump.zst") == data
    with storage.open("aitrapp-dump-1.dump.zst") as fh:
        assert fh.read() == data
    assert storage.size("aitrapp-dump-1.dump.zst") == len(data)
    assert storage.exists("aitrapp-dump-1.dump.zst")


def test_a_committed_writer_replaces_the_object(driver: Driver) -> None:
    storage = driver.storage
    storage.put_bytes("a.manifest.json", b"old")
    writer = storage.writer("a.manifest.json")
    writer.write(b"new, longer")
    assert storage.read_bytes("a.manifest.json") == b"old"  # until commit
    writer.commit()
    assert storage.read_bytes("a.manifest.json") == b"new, longer"
    storage.put_bytes("a.manifest.json", b"put")
    assert storage.read_bytes("a.manifest.json") == b"put"


def test_abort_leaves_nothing(driver: Driver) -> None:
    storage = driver.storage
    storage.put_bytes("kept.dump.zst", b"kept")
    writer = storage.writer("aitrapp-dump-1.dump.zst")
    writer.write(payload(driver.partial_size))
    writer.abort()
    assert keys(storage) == ["kept.dump.zst"]
    assert not storage.exists("aitrapp-dump-1.dump.zst")
    assert storage.clear_partials("") == []  # nothing partial is left behind either
    replacing = storage.writer("kept.dump.zst")
    replacing.write(b"never published")
    replacing.abort()
    assert storage.read_bytes("kept.dump.zst") == b"kept"


def test_a_dead_writers_partial_is_invisible_until_clear_partials_removes_it(driver: Driver,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # An upload that moved within LIVE_UPLOAD_SECONDS may have a live writer elsewhere: this one is known dead.
    monkeypatch.setattr(s3_uploads, "LIVE_UPLOAD_SECONDS", 0)
    storage = driver.storage
    writer = storage.writer("aitrapp-dump-1.dump.zst")
    writer.write(payload(driver.partial_size))
    driver.abandon(writer)
    assert keys(storage) == [] and keys(storage, recursive=False) == [] and keys(storage, "aitrapp") == []
    assert not storage.exists("aitrapp-dump-1.dump.zst")
    with pytest.raises(ObjectMissing):
        storage.open("aitrapp-dump-1.dump.zst")
    assert storage.clear_partials("other-db-") == []  # another database's prefix: not touched
    assert storage.clear_partials("aitrapp") != []
    assert storage.clear_partials("aitrapp") == []  # gone
    assert keys(storage) == []


def test_a_finished_object_survives_clear_partials(driver: Driver) -> None:
    storage = driver.storage
    storage.put_bytes("aitrapp-dump-1.dump.zst", b"done")
    assert storage.clear_partials("aitrapp") == []
    assert storage.read_bytes("aitrapp-dump-1.dump.zst") == b"done"


# --- missing objects ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["nothing.dump.zst", "no/such/dir/x.zst", "dir"])
def test_a_missing_key_is_object_missing_everywhere(driver: Driver, key: str) -> None:
    storage = driver.storage
    storage.put_bytes("dir/inside.zst", b"x")  # "dir" itself is then a directory, not an object
    assert not storage.exists(key)
    for call in (storage.open, storage.read_bytes, storage.size):
        with pytest.raises(ObjectMissing):
            call(key)


@pytest.mark.parametrize("key", ["../outside", "/etc/passwd", "a/../../b"])
def test_a_key_outside_the_location_is_refused_not_missing(driver: Driver, key: str) -> None:
    storage = driver.storage
    calls: list[Callable[[], object]] = [lambda: storage.read_bytes(key), lambda: storage.put_bytes(key, b"x"),
                                         lambda: storage.put_new(key, b"x"), lambda: storage.writer(key)]
    for call in calls:
        with pytest.raises(StorageError) as raised:
            call()
        assert not isinstance(raised.value, ObjectMissing)


# --- read_tail and features --------------------------------------------------------------------------

def test_read_tail_is_the_end_of_an_object(driver: Driver) -> None:
    storage = driver.storage
    data = payload(1000)
    storage.put_bytes("wal/0000000100000000/000000010000000000000001.zst", data)
    key = "wal/0000000100000000/000000010000000000000001.zst"
    assert storage.read_tail(key, 48) == data[-48:]
    assert storage.read_tail(key, 1000) == data and storage.read_tail(key, 5000) == data  # all of a short one
    for missing in ("wal/0000000100000000/000000010000000000000002.zst", "nothing.zst"):
        with pytest.raises(ObjectMissing):
            storage.read_tail(missing, 48)


def test_features_say_what_a_location_can_do(driver: Driver, tmp_path: Path) -> None:
    features = driver.storage.features
    assert isinstance(features, Features) and not features.read_only
    expected_root = {"local": tmp_path / "backups"}.get(driver.kind)
    assert features.local_root == expected_root  # files on this machine: only a directory
    assert MemoryStorage(lock=ObjectLock(1)).features.object_lock and not MemoryStorage().features.object_lock


def test_any_location_opened_read_only_refuses_writes_and_deletes(driver: Driver) -> None:
    storage = driver.storage
    storage.put_bytes("a.dump.zst", b"kept")
    read_only = ReadOnlyStorage(storage)
    assert read_only.features.read_only and read_only.location == storage.location
    assert read_only.read_bytes("a.dump.zst") == b"kept" and read_only.read_tail("a.dump.zst", 2) == b"pt"
    assert [o.key for o in read_only.list()] == ["a.dump.zst"] and read_only.exists("a.dump.zst")
    refused: list[Callable[[], object]] = [
        lambda: read_only.writer("b.dump.zst"), lambda: read_only.put_bytes("a.dump.zst", b"x"),
        lambda: read_only.put_new("b.dump.zst", b"x"), lambda: read_only.delete("a.dump.zst"),
        lambda: read_only.delete_many(["a.dump.zst"]), lambda: read_only.clear_partials()]
    for call in refused:
        with pytest.raises(StorageReadOnly):
            call()
    assert keys(storage) == ["a.dump.zst"] and storage.read_bytes("a.dump.zst") == b"kept"


def test_open_storage_read_only(tmp_path: Path) -> None:
    from backup_tasks.storage.locations import open_storage

    storage = open_storage(str(tmp_path / "backups"), read_only=True)
    assert storage.features.read_only and storage.features.local_root == tmp_path / "backups"
    with pytest.raises(StorageReadOnly):
        storage.put_bytes("a.dump.zst", b"x")
    assert not (tmp_path / "backups").exists()


# --- put_new -----------------------------------------------------------------------------------------

def test_put_new_creates_only(driver: Driver) -> None:
    storage = driver.storage
    key = "wal/0000000100000000/000000010000000000000001.zst"
    assert storage.put_new(key, b"first") is True
    assert storage.read_bytes(key) == b"first"
    assert storage.put_new(key, b"second, different") is False
    assert storage.read_bytes(key) == b"first"
    assert keys(storage) == [key]
    storage.put_bytes("taken.manifest.json", b"by put_bytes")
    assert storage.put_new("taken.manifest.json", b"mine") is False
    assert storage.read_bytes("taken.manifest.json") == b"by put_bytes"
    storage.delete(key)
    assert storage.put_new(key, b"again") is True
    assert storage.read_bytes(key) == b"again"


def test_concurrent_put_new_has_exactly_one_winner(driver: Driver) -> None:
    storage = driver.storage
    key = "aitrapp-dump-1.manifest.json"
    contenders = 6
    start = threading.Barrier(contenders)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def contend(i: int) -> None:
        start.wait()
        try:
            results[i] = storage.put_new(key, f"writer {i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1 and len(results) == contenders
    assert storage.read_bytes(key) == f"writer {winners[0]}".encode()
    # A later writer of different data loses too, and the first content stays.
    assert storage.put_new(key, b"late") is False
    assert storage.read_bytes(key) == f"writer {winners[0]}".encode()


# --- listing -----------------------------------------------------------------------------------------

LAYOUT = {
    "a.dump.zst": b"dump",
    "a.manifest.json": b"{}",
    "ab/c.txt": b"c",
    "b.manifest.json": b"{ }",
    "wal/0000000100000000/000000010000000000000001.zst": b"segment",
    "wal/history/00000002.history.zst": b"history",
}


def test_list_by_prefix_recursive_and_not(driver: Driver) -> None:
    storage = driver.storage
    for key, data in LAYOUT.items():
        storage.put_bytes(key, data)
    assert keys(storage) == sorted(LAYOUT)
    assert {o.key: o.size for o in storage.list()} == {k: len(v) for k, v in LAYOUT.items()}
    assert keys(storage, "a") == ["a.dump.zst", "a.manifest.json", "ab/c.txt"]
    assert keys(storage, "wal/") == ["wal/0000000100000000/000000010000000000000001.zst",
                                     "wal/history/00000002.history.zst"]
    assert keys(storage, "wal/h") == ["wal/history/00000002.history.zst"]
    assert keys(storage, "zzz") == [] and keys(storage, "nowhere/") == []


def test_non_recursive_list_stays_in_the_prefixs_directory(driver: Driver) -> None:
    storage = driver.storage
    for key, data in LAYOUT.items():
        storage.put_bytes(key, data)
    assert keys(storage, recursive=False) == ["a.dump.zst", "a.manifest.json", "b.manifest.json"]
    assert keys(storage, "a", recursive=False) == ["a.dump.zst", "a.manifest.json"]
    assert keys(storage, "wal/", recursive=False) == []
    assert keys(storage, "wal", recursive=False) == []
    assert keys(storage, "wal/history/", recursive=False) == ["wal/history/00000002.history.zst"]
    assert keys(storage, "wal/0000000100000000/0000", recursive=False) == [
        "wal/0000000100000000/000000010000000000000001.zst"]
    assert storage.list("b", recursive=False)[0].size == 3


# --- delete ------------------------------------------------------------------------------------------

def test_delete_is_idempotent(driver: Driver) -> None:
    storage = driver.storage
    storage.put_bytes("a.dump.zst", b"x")
    storage.put_bytes("b.dump.zst", b"y")
    storage.delete("a.dump.zst")
    assert not storage.exists("a.dump.zst") and keys(storage) == ["b.dump.zst"]
    storage.delete("a.dump.zst")
    storage.delete("never.dump.zst")
    storage.delete("no/such/dir/key.zst")
    assert keys(storage) == ["b.dump.zst"]



def test_delete_many_removes_every_key_and_reports_only_what_it_cannot(driver: Driver) -> None:
    storage = driver.storage
    for key in ("a.dump.zst", "wal/0000000100000000/000000010000000000000001.zst", "keep.dump.zst"):
        storage.put_bytes(key, b"x")
    failures = storage.delete_many(["a.dump.zst", "wal/0000000100000000/000000010000000000000001.zst",
                                    "never.dump.zst", "../outside.zst", "a.dump.zst"])
    assert list(failures) == ["../outside.zst"]  # a missing key is no failure; a refused one is named
    assert isinstance(failures["../outside.zst"], StorageError)  # typed, as ``delete`` would raise it
    assert keys(storage) == ["keep.dump.zst"]
    assert storage.delete_many([]) == {}


def test_nothing_is_held_where_no_lock_is_configured(driver: Driver) -> None:
    storage = driver.storage
    storage.put_bytes("a.dump.zst", b"x")
    assert storage.retention("a.dump.zst") is None and storage.retention("never.dump.zst") is None


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_a_locked_location_refuses_to_delete_with_the_date_the_lock_ends(kind: str,
                                                                          request: pytest.FixtureRequest) -> None:
    from datetime import UTC, datetime, timedelta

    from backup_tasks.errors import ObjectLocked
    from backup_tasks.storage.locations import open_storage
    from backup_tasks.storage.objectlock import ObjectLock

    storage: Storage = MemoryStorage(lock=ObjectLock(1)) if kind == "memory" else \
        open_storage(request.getfixturevalue("locked_bucket_url"))  # BACKUP_OBJECT_LOCK_DAYS=1 in the environment
    written = datetime.now(UTC)
    storage.put_bytes("a.dump.zst", b"x")
    failures = storage.delete_many(["a.dump.zst", "never.dump.zst"])
    assert list(failures) == ["a.dump.zst"]
    locked = failures["a.dump.zst"]
    assert isinstance(locked, ObjectLocked)
    assert written + timedelta(days=1, seconds=-5) < locked.retain_until < written + timedelta(days=1, seconds=5)
    assert storage.retention("a.dump.zst") == locked.retain_until
    assert keys(storage) == ["a.dump.zst"] and storage.read_bytes("a.dump.zst") == b"x"


def _put_many(storage: Storage, names: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.put_bytes(key, b"w"), names))


@pytest.mark.slow
def test_s3_delete_many_sends_one_delete_objects_request_per_1000_keys(bucket_url: str) -> None:
    storage = S3Storage.from_url(bucket_url)
    names = [f"wal/0000000100000000/{i:024X}.zst" for i in range(2100)]
    _put_many(storage, [*names, "keep.dump.zst"])
    calls: list[int] = []
    storage.client.meta.events.register(
        "before-parameter-build.s3.DeleteObjects", lambda params, **_: calls.append(len(params["Delete"]["Objects"])))
    assert storage.delete_many(names) == {}
    assert calls == [1000, 1000, 100]
    assert keys(storage) == ["keep.dump.zst"]


def test_s3_delete_many_reports_each_key_the_server_refuses(bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = S3Storage.from_url(bucket_url)
    _put_many(storage, ["a.zst", "locked.zst", "b.zst"])
    client = storage.client
    real = client.delete_objects

    def delete_objects(**kwargs: dict[str, object]) -> dict[str, object]:
        # The server refuses one key (an object-lock or a policy would), and deletes the rest.
        objects = kwargs["Delete"]["Objects"]
        refused = [o for o in objects if o["Key"].endswith("locked.zst")]  # type: ignore[index, union-attr]
        kwargs["Delete"]["Objects"] = [o for o in objects if o not in refused]  # type: ignore[index, union-attr]
        response = real(**kwargs)
        response.setdefault("Errors", []).extend(
            {"Key": o["Key"], "Code": "AccessDenied", "Message": "Access Denied"} for o in refused)
        return response

    monkeypatch.setattr(client, "delete_objects", delete_objects)
    failures = storage.delete_many(["a.zst", "locked.zst", "b.zst"])
    assert list(failures) == ["locked.zst"] and "AccessDenied" in str(failures["locked.zst"])
    assert isinstance(failures["locked.zst"], StorageAuthFailed)  # may not delete: typed, not a string to match
    assert keys(storage) == ["locked.zst"]


# --- mirrored: a key held by either location is taken ------------------------------------------------

def test_mirrored_put_new_respects_either_location_and_leaves_no_half(tmp_path: Path) -> None:
    primary, copy = LocalStorage(tmp_path / "primary"), MemoryStorage("copy")
    mirrored = MirroredStorage(primary, copy)
    assert mirrored.put_new("both.zst", b"1") is True
    assert primary.read_bytes("both.zst") == b"1" and copy.read_bytes("both.zst") == b"1"
    primary.put_bytes("primary-only.zst", b"p")
    assert mirrored.put_new("primary-only.zst", b"new") is False
    assert not copy.exists("primary-only.zst")  # what it created in the copy was taken back
    assert primary.read_bytes("primary-only.zst") == b"p"
    copy.put_bytes("copy-only.zst", b"c")
    assert mirrored.put_new("copy-only.zst", b"new") is False
    assert not primary.exists("copy-only.zst") and copy.read_bytes("copy-only.zst") == b"c"


def test_mirrored_read_says_missing_only_when_missing_in_both(tmp_path: Path) -> None:
    class Unreadable(MemoryStorage):
        def open(self, key: str) -> BinaryIO:
            raise StorageError(f"{key}: permission denied")

    mirrored = MirroredStorage(LocalStorage(tmp_path / "primary"), Unreadable("copy"))
    with pytest.raises(StorageError) as raised:
        mirrored.read_bytes("x.zst")
    assert not isinstance(raised.value, ObjectMissing) and "permission denied" in str(raised.value)
    with pytest.raises(ObjectMissing):
        MirroredStorage(LocalStorage(tmp_path / "p2"), MemoryStorage("c2")).read_bytes("x.zst")


# --- s3: a conditional write that raced another in-flight write is retried -----------------------------

def test_s3_put_new_retries_a_409_and_answers_false_only_when_an_object_is_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    from backup_tasks.errors import StorageUnavailable

    class Client:
        def __init__(self, conflicts: int, exists: bool) -> None:
            self.conflicts, self.exists, self.puts = conflicts, exists, 0

        def put_object(self, **kwargs: object) -> dict[str, object]:
            assert kwargs["IfNoneMatch"] == "*"
            self.puts += 1
            if self.puts <= self.conflicts:
                raise ClientError({"Error": {"Code": "ConditionalRequestConflict"}}, "PutObject")
            return {}

        def head_object(self, **kwargs: object) -> dict[str, object]:
            if not self.exists:
                raise ClientError({"Error": {"Code": "404"}}, "HeadObject")
            return {"ContentLength": 1}

        def head_bucket(self, **kwargs: object) -> dict[str, object]:
            return {}

        def get_object_lock_configuration(self, **kwargs: object) -> dict[str, object]:
            raise ClientError({"Error": {"Code": "ObjectLockConfigurationNotFoundError"}}, "GetObjectLockConfiguration")

    monkeypatch.setattr(time, "sleep", lambda _seconds: None)
    storage = S3Storage.from_url("s3://bucket/prefix")
    storage.clients._client = Client(conflicts=2, exists=False)  # type: ignore[assignment]
    assert storage.put_new("k", b"v") is True and storage.clients._client.puts == 3  # type: ignore[attr-defined]
    storage.clients._client = Client(conflicts=99, exists=True)  # type: ignore[assignment]
    assert storage.put_new("k", b"v") is False
    storage.clients._client = Client(conflicts=99, exists=False)  # type: ignore[assignment]
    with pytest.raises(StorageUnavailable):
        storage.put_new("k", b"v")


# --- one policy for a primary and its copy: the catalog's order and the WAL's -------------------------

class Recording(MemoryStorage):
    """A memory location that records its writes in a shared log, and fails the ones it is told to."""

    def __init__(self, name: str, log: list[str], failing: bool = False) -> None:
        super().__init__(name)
        self.log, self.failing = log, failing

    def put_new(self, key: str, data: bytes) -> bool:
        self.log.append(f"{self.location} {key}")
        if self.failing:
            raise StorageError(f"{self.location} is down")
        return super().put_new(key, data)


@pytest.mark.parametrize("policy", [BACKUPS, WAL])
def test_the_copy_policy_states_the_order_and_what_is_taken_back(policy: CopyPolicy) -> None:
    log: list[str] = []
    primary, copy = Recording("primary", log), Recording("copy", log)
    assert Mirror(primary, copy, policy).put_new("a.zst", b"a") == Written(Outcome.CREATED, Outcome.CREATED)
    first = "memory://copy" if policy.copy_first else "memory://primary"
    assert log[0] == f"{first} a.zst" and len(log) == 2
    # The second location fails: the catalog takes the first one's object back, the WAL keeps its primary's.
    second = primary if policy is BACKUPS else copy
    second.failing = True
    with pytest.raises(StorageError):
        Mirror(primary, copy, policy).put_new("b.zst", b"b")
    first_location = copy if policy is BACKUPS else primary
    assert first_location.exists("b.zst") is (policy is WAL)


def test_the_wal_policy_deletes_the_copy_first_and_keeps_what_the_copy_refused() -> None:
    from datetime import UTC, datetime, timedelta

    from backup_tasks.errors import ObjectLocked

    until = datetime.now(UTC) + timedelta(days=1)

    class Refusing(MemoryStorage):
        def delete(self, key: str) -> None:
            if key == "locked.zst":
                raise ObjectLocked(f"{key} is locked", until)
            super().delete(key)

    for policy in (WAL, BACKUPS):
        primary, copy = MemoryStorage("primary"), Refusing("copy")
        mirror = Mirror(primary, copy, policy)
        for key in ("locked.zst", "free.zst"):
            mirror.put_new(key, b"x")
        failures = mirror.delete_many(["locked.zst", "free.zst"])
        assert list(failures) == ["locked.zst"] and isinstance(failures["locked.zst"], ObjectLocked)
        assert not primary.exists("free.zst") and not copy.exists("free.zst") and copy.exists("locked.zst")
        # The WAL's expiry lists the primary alone: what the copy refused stays there to be found next time.
        assert primary.exists("locked.zst") is (policy is WAL)


# --- a directory: durable directories, and a taken key made durable before it is relied on -------------

def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.fsync`` is called on from now on."""
    import os

    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_directory_the_local_driver_creates_is_fsynced_into_its_parent(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path / "backups")
    calls = fsynced(monkeypatch)
    storage.put_bytes("wal/0000000100000000/000000010000000000000001.zst", b"x")
    root = tmp_path / "backups"
    for parent in (tmp_path, root, root / "wal"):  # the parents of the three new directories
        assert str(parent) in calls, (parent, calls)
    assert str(root / "wal" / "0000000100000000") in calls  # the object's own directory, after its rename


def test_put_new_finding_the_key_taken_makes_that_object_durable_first(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed between its link and its fsync left the object: whoever is told "taken" relies on it."""
    storage = LocalStorage(tmp_path / "archive")
    key = "0000000100000000/000000010000000000000001.zst"
    (tmp_path / "archive" / "0000000100000000").mkdir(parents=True)
    (tmp_path / "archive" / key).write_bytes(b"linked, never fsynced")
    calls = fsynced(monkeypatch)
    assert storage.put_new(key, b"another") is False
    assert calls == [str(tmp_path / "archive" / key), str(tmp_path / "archive" / "0000000100000000")]
    assert storage.read_bytes(key) == b"linked, never fsynced"
    assert not [p for p in (tmp_path / "archive").rglob("*") if PARTIAL_MARK in p.name], "nothing written for it"
