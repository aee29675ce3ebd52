"""Backups no one can delete: S3 Object Lock, append-only credentials, and reading a bucket as it was.

Against moto's S3 server (which enforces Object Lock retention, versioning and IAM policies) and
the memory driver, the reference for a locked location: locked writes carry their retention and a
Content-MD5, a locked version refuses deletion with its date (typed, not a string to match), a
bucket that cannot keep a lock is refused before the first write, a storage opened as of a time
reads the versions current then, and credentials that may only write still take a backup.
"""

from __future__ import annotations

import logging
import os
import pickle
import shlex
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.errors import (
    ConfigError,
    ObjectLocked,
    ObjectMissing,
    StorageAuthFailed,
    StorageReadOnly,
)
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Features
from backup_tasks.storage.integrity import PROBE_KEY, probe
from backup_tasks.storage.locations import open_locations, open_storage
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.storage.mirrored import MirroredStorage
from backup_tasks.storage.objectlock import BucketProtection, ObjectLock, object_lock_from_env
from backup_tasks.storage.s3 import MIB, S3Credentials, S3Location, S3Options, S3Storage
from backup_tasks.storage.versions import ObjectVersion, current_at
from backup_tasks.wal.layout import object_key
from tests.support.paths import BACKUP_TASKS
from tests.support.s3 import S3Server

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
SEGMENT = "000000010000000000000003"


# --- settings (no server) ----------------------------------------------------------------------------

def test_the_lock_settings_are_read_and_bad_values_are_config_errors() -> None:
    assert object_lock_from_env({}) is None
    assert object_lock_from_env({"BACKUP_OBJECT_LOCK_DAYS": "30"}) == ObjectLock(30, "GOVERNANCE")
    assert object_lock_from_env({"BACKUP_OBJECT_LOCK_DAYS": " 7 ", "BACKUP_OBJECT_LOCK_MODE": "compliance"}) == \
        ObjectLock(7, "COMPLIANCE")
    assert Settings.from_env({"BACKUP_OBJECT_LOCK_DAYS": "14"}).object_lock == ObjectLock(14)
    for env, says in [({"BACKUP_OBJECT_LOCK_DAYS": "0"}, "at least 1"),
                      ({"BACKUP_OBJECT_LOCK_DAYS": "a month"}, "whole number"),
                      ({"BACKUP_OBJECT_LOCK_DAYS": "30", "BACKUP_OBJECT_LOCK_MODE": "FOREVER"}, "GOVERNANCE or"),
                      ({"BACKUP_OBJECT_LOCK_MODE": "GOVERNANCE"}, "BACKUP_OBJECT_LOCK_DAYS is not")]:
        with pytest.raises(ConfigError, match=says) as raised:
            Settings.from_env(env)
        assert raised.value.exit_code == 2


def test_prune_credentials_are_a_profile_or_a_key_pair_and_the_secret_stays_out_of_reprs() -> None:
    assert Settings.from_env({}).prune_credentials is None
    assert Settings.from_env({"BACKUP_PRUNE_AWS_PROFILE": "prune"}).prune_credentials == S3Credentials(profile="prune")
    settings = Settings.from_env({"BACKUP_PRUNE_AWS_ACCESS_KEY_ID": "AKIAPRUNE",
                                  "BACKUP_PRUNE_AWS_SECRET_ACCESS_KEY": "prune/Secret/Key/123"})
    assert settings.prune_credentials is not None and settings.prune_credentials.access_key_id == "AKIAPRUNE"
    assert "prune/Secret/Key/123" in settings.secrets()
    assert "prune/Secret" not in repr(settings) and "prune/Secret" not in repr(settings.prune_credentials)
    for env in ({"BACKUP_PRUNE_AWS_ACCESS_KEY_ID": "AKIAPRUNE"},
                {"BACKUP_PRUNE_AWS_PROFILE": "prune", "BACKUP_PRUNE_AWS_ACCESS_KEY_ID": "AKIAPRUNE",
                 "BACKUP_PRUNE_AWS_SECRET_ACCESS_KEY": "x" * 20}):
        with pytest.raises(ConfigError):
            Settings.from_env(env)


def test_a_retention_shorter_than_the_lock_is_warned_about() -> None:
    assert Settings.from_env({"BACKUP_KEEP_DAILY_DAYS": "3"}).lock_outlasts_retention() == []
    settings = Settings.from_env({"BACKUP_OBJECT_LOCK_DAYS": "30", "BACKUP_KEEP_DAILY_DAYS": "7",
                                  "BACKUP_KEEP_WEEKLY": "4"})
    daily, weekly = settings.lock_outlasts_retention()
    assert "BACKUP_KEEP_DAILY_DAYS=7" in daily and "raise BACKUP_KEEP_DAILY_DAYS to 30" in daily
    assert "BACKUP_KEEP_WEEKLY=4" in weekly and "to 5" in weekly
    assert Settings.from_env({"BACKUP_OBJECT_LOCK_DAYS": "30", "BACKUP_KEEP_DAILY_DAYS": "30",
                              "BACKUP_KEEP_WEEKLY": "5"}).lock_outlasts_retention() == []


def test_bucket_protection_names_what_to_enable() -> None:
    lock = ObjectLock(30)
    assert BucketProtection("b", "Enabled", True).problems(lock) == []
    assert BucketProtection("b", "Off", False).problems(None) == []
    no_lock, no_versions = BucketProtection("b", "Off", False).problems(lock)
    assert "--object-lock-enabled-for-bucket" in no_lock and "Status=Enabled" in no_versions


# --- which version was current at a time (pure) ---------------------------------------------------------

def version(key: str, version_id: str, minutes: int, *, deleted: bool = False, size: int = 1) -> ObjectVersion:
    return ObjectVersion(key, version_id, T0 + timedelta(minutes=minutes), size, deleted)


def test_the_version_current_at_a_time_is_the_newest_written_by_then() -> None:
    history = [version("a", "a2", 20, size=2), version("a", "a1", 0),  # overwritten at :20
               version("b", "b1", 0), version("b", "b-del", 10, deleted=True),  # deleted at :10
               version("c", "c1", 30),  # written at :30
               version("d", "d2", 5, size=2), version("d", "d1", 5)]  # same instant: the one listed first is newer
    at_5 = current_at(history, T0 + timedelta(minutes=5))
    assert {k: v.version_id if v else None for k, v in at_5.items()} == {"a": "a1", "b": "b1", "c": None, "d": "d2"}
    at_25 = current_at(history, T0 + timedelta(minutes=25))
    assert {k: v.version_id if v else None for k, v in at_25.items()} == {"a": "a2", "b": None, "c": None, "d": "d2"}
    same_instant = [version("e", "e1", 0), version("e", "e-del", 0, deleted=True)]
    assert current_at(same_instant, T0) == {"e": None}  # written, then deleted, within one timestamp


# --- the memory driver: the reference for a locked location ---------------------------------------------

def test_memory_refuses_deleting_a_locked_key_until_its_lock_ends() -> None:
    now = [T0]
    storage = MemoryStorage(lock=ObjectLock(2), clock=lambda: now[0])
    storage.put_bytes("a.dump.zst", b"a")
    now[0] = T0 + timedelta(days=1)
    storage.put_bytes("a.dump.zst", b"rewritten")  # the older, locked version would still be there in S3
    assert storage.put_new("b.manifest.json", b"b") is True
    failures = storage.delete_many(["a.dump.zst", "b.manifest.json", "missing.zst"])
    assert set(failures) == {"a.dump.zst", "b.manifest.json"}
    locked = failures["a.dump.zst"]
    assert isinstance(locked, ObjectLocked) and locked.retain_until == T0 + timedelta(days=3)
    copied = pickle.loads(pickle.dumps(locked))  # crosses processes (Celery, multiprocessing) with its date
    assert isinstance(copied, ObjectLocked) and copied.retain_until == locked.retain_until
    assert storage.retention("a.dump.zst") == T0 + timedelta(days=3) and storage.retention("missing.zst") is None
    with pytest.raises(ObjectLocked):
        storage.delete("b.manifest.json")
    now[0] = T0 + timedelta(days=3, seconds=1)
    assert storage.retention("a.dump.zst") is None
    assert storage.delete_many(["a.dump.zst", "b.manifest.json"]) == {}
    assert storage.list() == []


def test_a_mirrored_delete_reports_the_later_lock_and_a_real_failure_over_a_lock() -> None:
    now = [T0]
    short = MemoryStorage("primary", lock=ObjectLock(1), clock=lambda: now[0])
    long = MemoryStorage("copy", lock=ObjectLock(5), clock=lambda: now[0])
    mirrored = MirroredStorage(short, long)
    mirrored.put_bytes("a.zst", b"a")
    failure = mirrored.delete_many(["a.zst"])["a.zst"]
    assert isinstance(failure, ObjectLocked) and failure.retain_until == T0 + timedelta(days=5)
    assert mirrored.retention("a.zst") == T0 + timedelta(days=5)

    class Refusing(MemoryStorage):
        def delete(self, key: str) -> None:
            raise StorageAuthFailed(f"{key}: AccessDenied")

    mirrored = MirroredStorage(short, Refusing("refusing"))
    mirrored.put_bytes("b.zst", b"b")
    failure = mirrored.delete_many(["b.zst"])["b.zst"]
    assert isinstance(failure, StorageAuthFailed) and "AccessDenied" in str(failure)


def test_as_of_needs_a_bucket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="versioned s3:// location") as raised:
        open_storage(str(tmp_path), as_of=T0)
    assert raised.value.exit_code == 2
    with pytest.raises(ConfigError):
        open_locations(str(tmp_path), str(tmp_path / "copy"), as_of=T0)
    with pytest.raises(ConfigError, match="timezone"):
        S3Storage(S3Location.parse("s3://bucket/p"), as_of=datetime(2026, 11, 27, 10, 0))
    # A directory beside a bucket cannot say what it held then: only the bucket is read.
    only_bucket = open_locations(str(tmp_path), "s3://bucket/copy", as_of=T0)
    assert isinstance(only_bucket, S3Storage) and only_bucket.as_of == T0 and only_bucket.location == "s3://bucket/copy"


# --- locked writes (moto) -------------------------------------------------------------------------------

def record_headers(storage: S3Storage, operation: str) -> list[dict[str, str]]:
    """The HTTP headers of every ``operation`` request the storage's client sends from now on."""
    seen: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        seen.append({name: value.decode() if isinstance(value, bytes) else value
                     for name, value in request.headers.items()})

    storage.client.meta.events.register(f"before-send.s3.{operation}", record)
    return seen


def head(server: S3Server, storage: S3Storage, key: str, **extra: str) -> dict[str, Any]:
    return server.admin_client().head_object(Bucket=storage.where.bucket, Key=storage.where.full_key(key),  # type: ignore[no-any-return]
                                             **extra)


def assert_locked_for_a_day(found: dict[str, Any], written: datetime) -> None:
    assert found["ObjectLockMode"] == "GOVERNANCE"
    until = found["ObjectLockRetainUntilDate"]
    day = timedelta(days=1)
    assert written + day - timedelta(seconds=5) <= until <= datetime.now(UTC) + day + timedelta(seconds=5)


def test_every_locked_write_carries_its_retention_and_a_content_md5(locked_bucket_url: str, s3_env: S3Server) -> None:
    storage = open_storage(locked_bucket_url)
    assert isinstance(storage, S3Storage) and storage.lock == ObjectLock(1, "GOVERNANCE")  # from the environment
    puts = record_headers(storage, "PutObject")
    written = datetime.now(UTC)
    storage.put_bytes("a.manifest.json", b"{}")
    assert storage.put_new("b.manifest.json", b"{}") is True
    with storage.writer("c.dump.zst") as writer:
        writer.write(b"small: one PutObject")
        writer.commit()
    assert len(puts) == 3
    for headers in puts:
        assert headers["x-amz-object-lock-mode"] == "GOVERNANCE" and "x-amz-object-lock-retain-until-date" in headers
        assert "Content-MD5" in headers
    for key in ("a.manifest.json", "b.manifest.json", "c.dump.zst"):
        assert_locked_for_a_day(head(s3_env, storage, key), written)


@pytest.mark.slow
def test_a_locked_multipart_upload_sends_content_md5_with_every_part_and_ends_locked(
        locked_bucket_url: str, s3_env: S3Server) -> None:
    # As open_storage opens it (the lock from the environment), with S3's smallest parts.
    storage = S3Storage.from_url(locked_bucket_url, S3Options(part_size=5 * MIB), lock=object_lock_from_env(os.environ))
    creates = record_headers(storage, "CreateMultipartUpload")
    parts = record_headers(storage, "UploadPart")
    written = datetime.now(UTC)
    writer = storage.writer("big.dump.zst")
    writer.write(os.urandom(11 * MIB))
    writer.commit()
    assert len(creates) == 1 and creates[0]["x-amz-object-lock-mode"] == "GOVERNANCE"
    assert len(parts) == 3 and all("Content-MD5" in headers for headers in parts)
    found = head(s3_env, storage, "big.dump.zst")
    assert found["ContentLength"] == 11 * MIB
    assert_locked_for_a_day(found, written)


def test_deleting_a_locked_object_is_refused_with_its_date_and_leaves_it_as_it_was(
        locked_bucket_url: str, s3_env: S3Server) -> None:
    storage = open_storage(locked_bucket_url)
    storage.put_bytes("a.dump.zst", b"backup")
    until = head(s3_env, storage, "a.dump.zst")["ObjectLockRetainUntilDate"]  # type: ignore[arg-type]
    failures = storage.delete_many(["a.dump.zst", "never-written.zst"])
    assert list(failures) == ["a.dump.zst"]
    locked = failures["a.dump.zst"]
    assert isinstance(locked, ObjectLocked) and abs(locked.retain_until - until) < timedelta(seconds=1)
    assert "locked until" in str(locked)
    with pytest.raises(ObjectLocked):
        storage.delete("a.dump.zst")
    assert storage.retention("a.dump.zst") == locked.retain_until
    assert storage.retention("never-written.zst") is None
    # Not even a delete marker was added: the backup is listed and read as before.
    assert [o.key for o in storage.list()] == ["a.dump.zst"] and storage.read_bytes("a.dump.zst") == b"backup"
    versions = s3_env.admin_client().list_object_versions(Bucket=storage.where.bucket)  # type: ignore[attr-defined]
    assert "DeleteMarkers" not in versions or versions["DeleteMarkers"] == []


def test_deletes_in_a_locked_bucket_remove_every_version_so_space_is_freed(
        locked_bucket_url: str, s3_env: S3Server) -> None:
    storage = open_storage(locked_bucket_url)
    assert isinstance(storage, S3Storage)
    admin = s3_env.admin_client()
    bucket, full = storage.where.bucket, storage.where.full_key
    for body in (b"1", b"2"):  # written without a retention (the bucket has no default): deletable
        admin.put_object(Bucket=bucket, Key=full("rewritten.zst"), Body=body)
    admin.put_object(Bucket=bucket, Key=full("wal/0000000100000000/gone.zst"), Body=b"x")
    admin.delete_object(Bucket=bucket, Key=full("wal/0000000100000000/gone.zst"))  # a delete marker on top
    admin.put_object(Bucket=bucket, Key=full("kept.zst"), Body=b"k")
    assert storage.delete_many(["rewritten.zst", "wal/0000000100000000/gone.zst"]) == {}
    left = admin.list_object_versions(Bucket=bucket)
    assert {v["Key"] for v in [*left.get("Versions", []), *left.get("DeleteMarkers", [])]} == {full("kept.zst")}


def test_a_bucket_that_cannot_keep_the_lock_is_refused_before_anything_is_written(
        s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUP_OBJECT_LOCK_DAYS", "30")
    for bucket in (s3_env.new_bucket(), s3_env.new_bucket(versioning=True)):
        storage = open_storage(f"s3://{bucket}/nightly", setting="BACKUP_COPY_TO")
        with pytest.raises(ConfigError, match="has no Object Lock configuration") as raised, \
                storage.writer("a.dump.zst") as writer:
            writer.write(os.urandom(MIB))
            writer.commit()
        assert raised.value.exit_code == 2 and "--object-lock-enabled-for-bucket" in str(raised.value)
        with pytest.raises(ConfigError):
            storage.put_new("a.manifest.json", b"{}")
        assert s3_env.admin_client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_a_process_without_the_lock_may_not_write_unlocked_objects_into_a_locked_bucket(s3_env: S3Server) -> None:
    bucket = s3_env.new_bucket(object_lock=True)
    storage = open_storage(f"s3://{bucket}/wal")  # BACKUP_OBJECT_LOCK_DAYS unset, as in a forgotten archive_command
    with pytest.raises(ConfigError, match="BACKUP_OBJECT_LOCK_DAYS") as raised:
        storage.put_new(object_key(SEGMENT), b"segment")
    assert "archive_command" in str(raised.value)
    # With a default retention the bucket locks what arrives itself: allowed (and sent with Content-MD5).
    s3_env.admin_client().put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2}}})
    storage = open_storage(f"s3://{bucket}/wal")
    assert storage.put_new(object_key(SEGMENT), b"segment") is True
    assert isinstance(storage, S3Storage)
    assert head(s3_env, storage, object_key(SEGMENT))["ObjectLockMode"] == "GOVERNANCE"


def segment_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SEGMENT
    path.write_bytes(os.urandom(256 * 1024) * 4)
    return path


@pytest.mark.slow
def test_wal_push_locks_the_copy_only_with_the_lock_in_its_command_and_refuses_without(
        tmp_path: Path, s3_env: S3Server) -> None:
    bucket = s3_env.new_bucket(object_lock=True)
    source = segment_file(tmp_path / "pg_wal")
    push = (f"{shlex.quote(BACKUP_TASKS)} wal-push --archive-dir {shlex.quote(str(tmp_path / 'archive'))} "
            f"--copy-to s3://{bucket}/prod {shlex.quote(str(source))}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUP_")}  # PostgreSQL's environment

    forgotten = subprocess.run(["sh", "-c", push], env=env, capture_output=True, text=True, timeout=60)
    assert forgotten.returncode == 2 and "BACKUP_OBJECT_LOCK_DAYS" in forgotten.stderr
    key = f"prod/wal/{object_key(SEGMENT)}"
    assert s3_env.admin_client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0

    assignments = " ".join(f"{name}={value}" for name, value in ObjectLock(1).environment().items())
    pushed = subprocess.run(["sh", "-c", f"{assignments} {push}"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    found = s3_env.admin_client().head_object(Bucket=bucket, Key=key)
    assert found["ObjectLockMode"] == "GOVERNANCE" and found["ObjectLockRetainUntilDate"] > datetime.now(UTC)


# --- reading the bucket as it was -----------------------------------------------------------------------

def next_second() -> datetime:
    """A moment strictly between what was written before and what is written after (moto keeps whole seconds)."""
    time.sleep(1.05 - time.time() % 1)
    moment = datetime.now(UTC)
    time.sleep(1.05 - time.time() % 1)
    return moment


@pytest.mark.slow
def test_as_of_reads_what_was_there_before_delete_markers_and_overwrites(
        locked_bucket_url: str, s3_env: S3Server) -> None:
    storage = open_storage(locked_bucket_url)
    assert isinstance(storage, S3Storage)
    storage.put_bytes("a.dump.zst", b"good backup")
    storage.put_bytes("a.manifest.json", b'{"good": true}')
    storage.put_bytes("wal/0000000100000000/seg.zst", b"segment")
    before_attack = next_second()
    # The attack, through the API with the workers' credentials: delete markers and overwrites (the locked
    # versions underneath cannot be removed, only hidden).
    admin, bucket, full = s3_env.admin_client(), storage.where.bucket, storage.where.full_key
    admin.delete_object(Bucket=bucket, Key=full("a.dump.zst"))
    admin.delete_object(Bucket=bucket, Key=full("wal/0000000100000000/seg.zst"))
    storage.put_bytes("a.manifest.json", b"ransom note")
    storage.put_bytes("b.dump.zst", b"written later")
    assert [o.key for o in storage.list()] == ["a.manifest.json", "b.dump.zst"]

    then = open_storage(locked_bucket_url, as_of=before_attack)
    assert [o.key for o in then.list()] == ["a.dump.zst", "a.manifest.json", "wal/0000000100000000/seg.zst"]
    assert [o.key for o in then.list("", recursive=False)] == ["a.dump.zst", "a.manifest.json"]
    assert then.read_bytes("a.dump.zst") == b"good backup"
    assert then.read_bytes("a.manifest.json") == b'{"good": true}'
    assert then.size("a.dump.zst") == len(b"good backup") and then.exists("wal/0000000100000000/seg.zst")
    assert isinstance(then, S3Storage) and then.read_tail("a.manifest.json", 6) == b'{"good": true}'[-6:]
    fresh = open_storage(locked_bucket_url, as_of=before_attack)  # without a listing first: looked up per key
    with fresh.open("a.dump.zst") as fh:
        assert fh.read() == b"good backup"
    assert not fresh.exists("b.dump.zst")
    with pytest.raises(ObjectMissing, match="as of"):
        fresh.read_bytes("b.dump.zst")
    for write in (lambda: then.put_bytes("x", b"x"), lambda: then.writer("x"), lambda: then.delete("a.dump.zst"),
                  lambda: then.delete_many(["a.dump.zst"]), lambda: then.clear_partials("")):
        with pytest.raises(StorageReadOnly) as raised:
            write()
        assert raised.value.exit_code == 2


@pytest.mark.slow
def test_features_are_asked_of_the_bucket_once_at_first_use_never_when_it_is_opened(
        locked_bucket_url: str, s3_env: S3Server) -> None:
    requests: list[str] = []

    def counted(storage: S3Storage) -> S3Storage:
        storage.client.meta.events.register("before-call.s3", lambda model, **_: requests.append(model.name))
        return storage

    plain = counted(S3Storage.from_url(f"s3://{s3_env.new_bucket()}/p"))
    assert requests == []
    assert plain.features == plain.features == Features(read_only=False, object_lock=False, versioned=False)
    assert requests == ["GetObjectLockConfiguration", "GetBucketVersioning"]  # each once
    versioned = S3Storage.from_url(f"s3://{s3_env.new_bucket(versioning=True)}/p")
    assert versioned.features == Features(versioned=True)
    requests.clear()
    locked = open_storage(locked_bucket_url)
    assert isinstance(locked, S3Storage)
    assert counted(locked).features == Features(object_lock=True, versioned=True)
    assert requests == ["GetObjectLockConfiguration"]  # Object Lock is only ever on with versioning
    then = open_storage(locked_bucket_url, as_of=datetime.now(UTC))
    assert then.features == Features(read_only=True, object_lock=True, versioned=True)


@pytest.mark.slow
def test_as_of_on_a_bucket_that_never_kept_versions_is_a_config_error(bucket_url: str) -> None:
    open_storage(bucket_url).put_bytes("a.dump.zst", b"a")
    with pytest.raises(ConfigError, match="never had versioning enabled"):
        open_storage(bucket_url, as_of=datetime.now(UTC)).list()


# --- append-only credentials and prune's own --------------------------------------------------------------

#: What the README's worker policy allows, minus everything that deletes. These are the IAM actions AWS
#: documents ("Multipart upload API and permissions", Amazon S3 User Guide): CreateMultipartUpload,
#: UploadPart and CompleteMultipartUpload are authorised as s3:PutObject. moto 5.2.6 authorises the
#: first as "s3:CreateMultipartUpload", an action IAM does not have, so no real policy could grant it:
#: a moto regression (the same bug as ministack #1588), excluded in pyproject.toml's test extra.
APPEND_ONLY = ["s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:ListBucketMultipartUploads",
               "s3:ListMultipartUploadParts", "s3:PutObjectRetention", "s3:GetObjectRetention",
               "s3:GetBucketObjectLockConfiguration", "s3:GetBucketVersioning"]


def use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def abandoned_upload(storage: S3Storage, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multipart upload left by a run that died long ago (its start moved back past LIVE_UPLOAD_SECONDS)."""
    from backup_tasks.storage.s3 import uploads as s3_uploads

    writer = storage.writer(key)
    writer.write(os.urandom(6 * MIB))
    for future in list(writer._pending):
        future.result()
    s3_uploads.LIVE_UPLOADS.discard(str(writer._upload_id))
    writer._closed = True  # never committed nor aborted, as when the process is killed
    if writer._pool is not None:
        writer._pool.shutdown(wait=True)
    monkeypatch.setattr(s3_uploads, "LIVE_UPLOAD_SECONDS", -1)


@pytest.mark.slow
def test_append_only_credentials_take_a_backup_and_their_refused_cleanup_is_only_a_warning(
        locked_bucket_url: str, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    bucket = S3Location.parse(locked_bucket_url).bucket
    use(monkeypatch, s3_env.new_user(bucket, APPEND_ONLY))
    # As open_storage opens it (the lock from the environment), with S3's smallest parts.
    storage = S3Storage.from_url(locked_bucket_url, S3Options(part_size=5 * MIB), lock=object_lock_from_env(os.environ))
    abandoned_upload(storage, "aitrapp-dump-old.dump.zst", monkeypatch)
    with caplog.at_level(logging.WARNING):
        # What a dump does: clear what dead runs left, stream the dump, record its manifest create-only.
        assert storage.clear_partials("aitrapp-dump-") == []
        writer = storage.writer("aitrapp-dump-20261127T020000Z.dump.zst")
        writer.write(os.urandom(6 * MIB))
        writer.commit()
        assert storage.put_new("aitrapp-dump-20261127T020000Z.manifest.json", b"{}") is True
    assert "may not abort the unfinished upload" in caplog.text
    assert storage.read_bytes("aitrapp-dump-20261127T020000Z.manifest.json") == b"{}"
    with pytest.raises(StorageAuthFailed, match="AccessDenied"):  # may not even list versions: prune's business
        storage.delete_many(["aitrapp-dump-20261127T020000Z.manifest.json"])
    status = probe(storage)
    assert status.writable and status.error is None and status.delete_refused is not None
    assert (status.versioning, status.object_lock, status.lock) == ("Enabled", True, "GOVERNANCE, 1 day")


@pytest.mark.slow
def test_prune_deletes_with_its_own_credentials_where_the_workers_may_only_write(
        s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bucket = s3_env.new_bucket()
    use(monkeypatch, s3_env.new_user(bucket, APPEND_ONLY))
    url = f"s3://{bucket}/nightly"
    open_storage(url).put_bytes("old.dump.zst", b"expired")
    refused = open_storage(url).delete_many(["old.dump.zst"])
    assert isinstance(refused["old.dump.zst"], StorageAuthFailed)

    prune_env = s3_env.new_user(bucket, [*APPEND_ONLY, "s3:DeleteObject", "s3:DeleteObjectVersion",
                                         "s3:ListBucketVersions"])
    (tmp_path / "credentials").write_text(f"[prune]\naws_access_key_id = {prune_env['AWS_ACCESS_KEY_ID']}\n"
                                          f"aws_secret_access_key = {prune_env['AWS_SECRET_ACCESS_KEY']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    settings = Settings.from_env({"BACKUP_DIR": url, "BACKUP_PRUNE_AWS_PROFILE": "prune"})
    pruning = open_locations(settings.backup_dir, credentials=settings.prune_credentials)
    assert pruning.delete_many(["old.dump.zst"]) == {}
    assert open_storage(url).list() == []
    key_pair = S3Credentials(access_key_id=prune_env["AWS_ACCESS_KEY_ID"],
                             secret_access_key=prune_env["AWS_SECRET_ACCESS_KEY"])
    open_storage(url).put_bytes("older.dump.zst", b"expired")
    assert open_storage(url, credentials=key_pair).delete_many(["older.dump.zst"]) == {}
    with pytest.raises(ConfigError, match="BACKUP_PRUNE_AWS_PROFILE"):
        open_storage(url, credentials=S3Credentials(profile="no-such-profile")).list()


def test_check_probes_a_locked_bucket_and_reports_what_it_enforces(locked_bucket_url: str) -> None:
    storage = open_storage(locked_bucket_url)
    status = probe(storage)
    assert status.reachable and status.writable and status.error is None
    assert (status.versioning, status.object_lock, status.lock, status.default_retention) == \
        ("Enabled", True, "GOVERNANCE, 1 day", None)
    assert status.delete_refused is not None and "locked until" in status.delete_refused
    assert storage.exists(PROBE_KEY)  # held by its lock; the next probe after a day deletes it

