"""S3Storage against a real S3-compatible server (moto's standalone server, enforcing signatures)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backup_tasks.errors import BucketMissing, ConfigError, ObjectMissing, StorageAuthFailed, StorageUnavailable
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.locations import open_storage
from backup_tasks.storage.s3 import MIB, S3Location, S3Options, S3Storage
from backup_tasks.storage.s3 import uploads as s3_uploads
from tests.support.data import random_chunks
from tests.support.paths import BACKUP_TASKS, ROOT
from tests.support.postgres import url_of
from tests.support.s3 import S3Server, free_port

SMALL_PARTS = S3Options(part_size=5 * MIB)  # S3's minimum, so multipart tests stay quick


def sha256_of(fh: object, chunk: int = MIB) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while data := fh.read(chunk):  # type: ignore[attr-defined]
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


# --- URLs and settings (no server needed) ------------------------------------------------------------

def test_s3_urls_parse_into_bucket_and_prefix() -> None:
    assert S3Location.parse("s3://backups") == S3Location("backups", "")
    assert S3Location.parse("s3://backups/") == S3Location("backups", "")
    assert S3Location.parse("s3://backups/nightly//aitrapp/") == S3Location("backups", "nightly/aitrapp/")
    assert S3Location.parse("s3://backups/nightly/aitrapp").url == "s3://backups/nightly/aitrapp"
    assert S3Location.parse("s3://backups/a").full_key("x.dump.zst") == "a/x.dump.zst"


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://b/../etc", "s3://bucket/p?x=1", "s3://a b/p"])
def test_malformed_s3_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        S3Location.parse(url)
    assert raised.value.exit_code == 2


def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"BACKUP_DIR": "s3://AKIAXXXX:TopSecretKey123@bucket/prefix"})
    assert "TopSecretKey123" not in str(raised.value)
    assert "AWS_ACCESS_KEY_ID" in str(raised.value)


def test_open_storage_picks_the_implementation_and_keeps_local_paths(tmp_path: Path) -> None:
    local = open_storage(str(tmp_path / "b"))
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "b"
    remote = open_storage("s3://bucket/prefix")
    assert isinstance(remote, S3Storage) and remote.location == "s3://bucket/prefix"
    with pytest.raises(ConfigError):
        open_storage("ftp://host/dir")


def test_settings_keep_the_aws_secret_for_scrubbing_but_not_in_repr() -> None:
    settings = Settings.from_env({"BACKUP_DIR": "s3://bucket/x", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG"})
    assert "wJalrXUtnFEMI/K7MDENG" in settings.secrets()
    assert "wJalrXUtnFEMI" not in repr(settings)


def test_default_timeouts_fail_a_dead_endpoint_within_two_minutes() -> None:
    assert S3Options().worst_case_seconds < 120
    with pytest.raises(ConfigError):
        S3Options(part_size=4 * MIB)


# --- the Storage interface on a bucket ---------------------------------------------------------------

def test_put_list_read_delete_round_trip(bucket_url: str) -> None:
    storage = open_storage(bucket_url)
    storage.put_bytes("a.manifest.json", b'{"id": "a"}')
    storage.put_bytes("wal/000000010000000000000001", b"segment")
    outside = S3Storage.from_url(bucket_url.rsplit("/", 1)[0])  # the parent prefix
    outside.put_bytes("not-ours.txt", b"elsewhere")
    keys = [o.key for o in storage.list()]
    assert keys == ["a.manifest.json", "wal/000000010000000000000001"]
    assert [o.key for o in storage.list("wal/")] == ["wal/000000010000000000000001"]
    assert storage.list()[0].size == len(b'{"id": "a"}') and storage.list()[0].mtime > time.time() - 300
    assert storage.read_bytes("a.manifest.json") == b'{"id": "a"}'
    assert storage.exists("a.manifest.json") and not storage.exists("b.manifest.json")
    assert storage.size("wal/000000010000000000000001") == 7
    storage.delete("a.manifest.json")
    storage.delete("a.manifest.json")  # deleting what is gone is fine, as locally
    assert [o.key for o in storage.list()] == ["wal/000000010000000000000001"]
    with pytest.raises(ObjectMissing):
        storage.read_bytes("a.manifest.json")
    with pytest.raises(ObjectMissing):
        storage.size("a.manifest.json")


def test_put_new_never_overwrites(bucket_url: str) -> None:
    storage = S3Storage.from_url(bucket_url)
    assert storage.put_new("wal/000000010000000000000001.zst", b"first") is True
    assert storage.put_new("wal/000000010000000000000001.zst", b"second") is False
    assert storage.read_bytes("wal/000000010000000000000001.zst") == b"first"


def test_small_object_is_one_put_and_invisible_until_commit(bucket_url: str) -> None:
    storage = S3Storage.from_url(bucket_url)
    with storage.writer("small.dump.zst") as writer:
        writer.write(b"PGDMP" + b"x" * 1000)
        assert storage.list() == []
        writer.commit()
    assert storage.read_bytes("small.dump.zst") == b"PGDMP" + b"x" * 1000
    assert writer.bytes_written == 1005
    assert storage.unfinished_uploads() == []


@pytest.mark.slow
def test_multipart_upload_streams_parts_and_publishes_on_commit(bucket_url: str) -> None:
    storage = S3Storage.from_url(bucket_url, SMALL_PARTS)
    total = 12 * MIB + 12345  # three parts: 5 MiB, 5 MiB, the rest
    expected = hashlib.sha256()
    writer = storage.writer("big.dump.zst")
    for chunk in random_chunks(total):
        writer.write(chunk)
        expected.update(chunk)
    # Two full parts are uploaded (or uploading) already, yet nothing is visible under the key.
    assert [key for key, _id, _t in storage.unfinished_uploads()] == ["big.dump.zst"]
    assert storage.list() == [] and not storage.exists("big.dump.zst")
    writer.commit()
    head = storage.head("big.dump.zst")
    assert head is not None and head["ETag"].strip('"').endswith("-3"), head["ETag"]  # really three parts
    assert storage.size("big.dump.zst") == total == writer.bytes_written
    with storage.open("big.dump.zst") as fh:
        assert sha256_of(fh) == (expected.hexdigest(), total)
    assert storage.unfinished_uploads() == []


@pytest.mark.slow
def test_parts_grow_so_long_uploads_never_run_out_of_part_numbers(bucket_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tasks.storage.s3 import writer as s3_writer

    monkeypatch.setattr(s3_writer, "PARTS_PER_SIZE_STEP", 2)  # double every 2 parts instead of every 1000
    storage = S3Storage.from_url(bucket_url, SMALL_PARTS)
    data = b"".join(random_chunks(32 * MIB))
    with storage.writer("growing.bin") as writer:
        writer.write(data)
        writer.commit()
    head = storage.head("growing.bin")
    assert head is not None and head["ETag"].strip('"').endswith("-5")  # 5 + 5 + 10 + 10 + 2 MiB
    assert storage.read_bytes("growing.bin") == data


@pytest.mark.slow
def test_abort_and_exceptions_leave_no_object_and_no_upload(bucket_url: str) -> None:
    storage = S3Storage.from_url(bucket_url, SMALL_PARTS)
    writer = storage.writer("aborted.dump.zst")
    for chunk in random_chunks(11 * MIB):
        writer.write(chunk)
    assert len(storage.unfinished_uploads()) == 1
    writer.abort()
    writer.abort()  # twice is harmless
    assert storage.list() == [] and storage.unfinished_uploads() == []

    with pytest.raises(RuntimeError), storage.writer("failed.dump.zst") as failing:
        for chunk in random_chunks(6 * MIB):
            failing.write(chunk)
        raise RuntimeError("pg_dump died")
    assert storage.list() == [] and storage.unfinished_uploads() == []


def test_reading_resumes_when_the_connection_breaks_midway(bucket_url: str) -> None:
    storage = S3Storage.from_url(bucket_url, SMALL_PARTS)
    data = b"".join(random_chunks(7 * MIB))
    with storage.writer("resume.bin") as writer:
        writer.write(data)
        writer.commit()
    with storage.open("resume.bin") as fh:
        first = fh.read(2 * MIB)
        fh.raw._body.close()  # type: ignore[attr-defined]  # the connection drops mid-download
        rest = fh.read()
    assert first + rest == data


@pytest.mark.slow
def test_killed_upload_leaves_nothing_and_the_next_run_aborts_it(bucket_url: str, s3_env: S3Server,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    script = textwrap.dedent(f"""
        import sys
        from backup_tasks.storage.s3 import S3Options, S3Storage, MIB
        storage = S3Storage.from_url({bucket_url!r}, S3Options(part_size=5 * MIB))
        writer = storage.writer("aitrapp-dump-20261127T020000Z.dump.zst")
        chunk = bytes(range(256)) * 4096
        for i in range(12):
            writer.write(chunk)
        while not storage.unfinished_uploads():
            pass
        print("uploading", flush=True)
        while True:
            writer.write(chunk)  # a dump that goes on and on, until SIGKILL
    """)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3_env.env()}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"uploading"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    storage = S3Storage.from_url(bucket_url)
    assert storage.list() == []  # nothing the catalog could mistake for a backup
    left = storage.unfinished_uploads("aitrapp")
    assert [key for key, _id, _t in left] == ["aitrapp-dump-20261127T020000Z.dump.zst"]
    # A writer alive in this process is not touched by the clean-up.
    live = S3Storage.from_url(bucket_url, SMALL_PARTS).writer("aitrapp-dump-20261128T020000Z.dump.zst")
    for chunk in random_chunks(6 * MIB):
        live.write(chunk)
    # From another process's point of view, an upload that moved seconds ago may still have a live
    # writer (one that stalled past its lock's expiry): it is left alone until it has been quiet a while.
    assert storage.clear_partials("aitrapp") == []
    monkeypatch.setattr(s3_uploads, "LIVE_UPLOAD_SECONDS", 0)
    assert storage.clear_partials("aitrapp") == ["aitrapp-dump-20261127T020000Z.dump.zst"]
    assert [key for key, _id, _t in storage.unfinished_uploads()] == ["aitrapp-dump-20261128T020000Z.dump.zst"]
    live.commit()
    assert [o.key for o in storage.list()] == ["aitrapp-dump-20261128T020000Z.dump.zst"]
    assert storage.unfinished_uploads() == [] and storage.clear_partials("aitrapp") == []


# --- failures: clear, typed, bounded, and without secrets -------------------------------------------

def test_wrong_secret_key_is_refused_without_leaking_it(bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_secret = "Wr0ngSecretKeyWr0ngSecretKeyWr0ngSecret1"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage = S3Storage.from_url(bucket_url)
    for attempt in (storage.list, lambda: storage.put_bytes("x", b"y"), lambda: storage.read_bytes("x"),
                    lambda: storage.exists("x")):
        with pytest.raises(StorageAuthFailed) as raised:
            attempt()
        assert wrong_secret not in str(raised.value)
        assert raised.value.exit_code == 1 and not raised.value.retryable
    with pytest.raises(StorageAuthFailed, match="SignatureDoesNotMatch"):
        storage.list()
    assert storage.secrets() == [wrong_secret]  # known, so Sentry scrubbing can remove it


def test_unknown_access_key_is_refused(bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    storage = S3Storage.from_url(bucket_url)
    with pytest.raises(StorageAuthFailed, match="InvalidAccessKeyId"), storage.writer("k") as writer:
        writer.write(b"data")
        writer.commit()


def test_credentials_from_a_profile(bucket_url: str, s3_env: S3Server, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[offsite]\naws_access_key_id = {s3_env.access_key_id}\n"
                           f"aws_secret_access_key = {s3_env.secret_access_key}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "offsite")
    storage = S3Storage.from_url(bucket_url)
    storage.put_bytes("k", b"v")
    assert [o.key for o in storage.list()] == ["k"]
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ConfigError, match="no-such-profile"):
        S3Storage.from_url(bucket_url).list()


def test_no_credentials_at_all(bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageAuthFailed, match="no usable AWS credentials"):
        S3Storage.from_url(bucket_url).list()


def test_missing_bucket_is_named(s3_env: S3Server) -> None:
    storage = S3Storage.from_url("s3://bt-test-no-such-bucket/prefix")
    for attempt in (storage.list, lambda: storage.exists("x"), lambda: storage.read_bytes("x"),
                    lambda: storage.put_bytes("x", b"y"), lambda: storage.clear_partials("")):
        with pytest.raises(BucketMissing, match="bt-test-no-such-bucket"):
            attempt()


def test_closed_port_fails_fast_and_retryable(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    storage = S3Storage.from_url("s3://bucket/prefix")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as raised:
        storage.list()
    assert time.monotonic() - started < 30
    assert raised.value.retryable and "did not answer" in str(raised.value)
    assert s3_env.secret_access_key not in str(raised.value)


@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_within_the_bound(s3_env: S3Server,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Accepts connections and then says nothing: only timeouts can end this.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    options = S3Options(connect_timeout=1, read_timeout=2, max_attempts=2)
    storage = S3Storage.from_url("s3://bucket/prefix", options)
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable):
            storage.put_bytes("x", b"y")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
    assert options.read_timeout * options.max_attempts <= elapsed <= options.worst_case_seconds + 2


# --- the daily dump on a bucket: a killed run leaves nothing, the next run clears its upload ----------

@pytest.mark.slow
def test_a_killed_dump_to_a_bucket_is_cleared_by_the_next_run(bucket_url: str, s3_env: S3Server,
                                                              make_database: object, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from backup_tasks.catalog import manifest as catalog
    from backup_tasks.postgres.sampledata import generate

    source = make_database()  # type: ignore[operator]
    generate(source, size_mb=300)  # ~50 MiB compressed: several 8 MiB parts, a few seconds of upload
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BACKUP_", "CELERY_"))},
           **s3_env.env(), "DATABASE_URL": url_of(source), "BACKUP_DIR": bucket_url,
           "CELERY_BROKER_URL": "memory://"}  # file lock: the kernel drops it with the killed process
    storage = S3Storage.from_url(bucket_url)
    proc = subprocess.Popen([BACKUP_TASKS, "dump"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def parts_sent() -> int:
        uploads = storage.unfinished_uploads()
        if not uploads:
            return 0
        key, upload_id, _ = uploads[0]
        listed = storage.client.list_parts(Bucket=storage.where.bucket, Key=storage.where.object_key(key),
                                           UploadId=upload_id)
        return len(listed.get("Parts", []))

    try:
        deadline = time.monotonic() + 120
        while not parts_sent() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the dump finished before it could be killed midway"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert storage.list() == []  # no dump, no manifest: nothing the catalog could take for a backup
    (left,) = storage.unfinished_uploads()

    done = subprocess.run([BACKUP_TASKS, "dump", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    # A part moved seconds ago: its writer might be alive elsewhere, so the next run leaves it, and says so...
    assert storage.unfinished_uploads() == [left] and "left the unfinished upload" in done.stderr
    # ...and a run after LIVE_UPLOAD_SECONDS of quiet aborts it.
    monkeypatch.setattr(s3_uploads, "LIVE_UPLOAD_SECONDS", 0)
    assert storage.clear_partials() == [left[0]] and storage.unfinished_uploads() == []
    assert [m.id for m in catalog.catalog(storage)] == [manifest["id"]]
    assert storage.size(manifest["path"]) == manifest["size_bytes"] > 16 * MIB
