"""Issue 6 end to end through the CLI: encrypted dumps, BACKUP_DIR in a bucket, BACKUP_COPY_TO with fallback."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import count_rows
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.locations import open_locations
from backup_tasks.storage.s3 import S3Storage
from backup_tasks.streams.crypto import AGE_MAGIC
from tests.support.crypto import write_identity_file
from tests.support.paths import BACKUP_TASKS
from tests.support.pitr import Scenario, cli_env, marks, run_cli
from tests.support.postgres import url_of
from tests.support.processes import worker_env
from tests.support.s3 import S3Server


def run(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BACKUP_TASKS, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def run_json(*args: str, env: dict[str, str], code: int = 0) -> dict:  # type: ignore[type-arg]
    result = run(*args, "--json", env=env)
    assert result.returncode == code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def verify_url(pg_admin: ConnInfo) -> str:
    """Verify restores into a scratch database on the test server (faster than a throwaway cluster)."""
    return url_of(pg_admin.with_dbname("postgres"))


def base_env(db: ConnInfo, backup_dir: str, verify_url: str, **extra: str) -> dict[str, str]:
    return worker_env(DATABASE_URL=url_of(db), BACKUP_DIR=backup_dir, BACKUP_LOCK_URL="",
                      VERIFY_DATABASE_URL=verify_url, **extra)


# --- encryption ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_encrypted_dump_round_trip_through_the_cli(
        trading_db: ConnInfo, make_database: Callable[..., ConnInfo], tmp_path: Path, verify_url: str) -> None:
    key_file = tmp_path / "keys" / "backup.key"
    key_file.parent.mkdir()
    public = write_identity_file(key_file)
    # The worker that dumps knows only the public key.
    env = base_env(trading_db, str(tmp_path / "b"), verify_url, BACKUP_ENCRYPT_RECIPIENT=public)
    dumped = run_json("dump", env=env)
    assert dumped["encryption"] == {"format": "age", "recipients": [public]}
    assert dumped["path"].endswith(".dump.zst.age")
    stored = tmp_path / "b" / dumped["path"]
    data = stored.read_bytes()
    # The stored object is ciphertext: not a zstd frame, no pg_dump header, no table name in clear.
    assert data.startswith(AGE_MAGIC) and b"PGDMP" not in data and b"orders" not in data
    assert dumped["size_bytes"] == len(data) and dumped["sha256"] == hashlib.sha256(data).hexdigest()
    assert oct(stored.stat().st_mode & 0o777) == "0o600"
    manifest_text = (tmp_path / "b" / f"{dumped['id']}.manifest.json").read_text()
    assert "AGE-SECRET-KEY" not in manifest_text

    # Without an identity, verify and restore refuse clearly (exit 1), touching nothing.
    target = make_database()
    missing = run("restore", dumped["id"], "--target-database-url", url_of(target), env=env)
    assert missing.returncode == 1 and "BACKUP_DECRYPT_IDENTITY_FILE is not set" in missing.stderr
    wrong_file = tmp_path / "keys" / "wrong.key"
    write_identity_file(wrong_file)
    wrong = run("restore", dumped["id"], "--target-database-url", url_of(target), env=env | {
        "BACKUP_DECRYPT_IDENTITY_FILE": str(wrong_file)})
    assert wrong.returncode == 1 and "wrong identity" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "AGE-SECRET-KEY" not in wrong.stderr
    with connect(target) as conn:
        assert count_rows(conn) == {}  # the target was not touched
    wrong_verify = run("verify", "--json", env=env | {"BACKUP_DECRYPT_IDENTITY_FILE": str(wrong_file)})
    assert wrong_verify.returncode == 1 and "wrong identity" in json.loads(wrong_verify.stdout)["error"]

    reader_env = env | {"BACKUP_DECRYPT_IDENTITY_FILE": str(key_file)}
    verified = run_json("verify", env=reader_env)
    assert verified["ok"] and "restore" in verified["checked"] and verified["tables_compared"] == 6
    restored = run_json("restore", dumped["id"], "--target-database-url", url_of(target), env=reader_env)
    assert restored["ok"] and restored["rows"] == sum(dumped["tables"].values())
    with connect(target) as conn:
        assert count_rows(conn) == dumped["tables"]

    # A flipped byte in the ciphertext: verify fails and says so (the checksum needs no key).
    flip_byte(stored)
    damaged = run_json("verify", env=reader_env, code=1)
    assert not damaged["ok"] and "fails its checksum" in damaged["problems"][0]
    assert run("restore", dumped["id"], "--target-database-url", url_of(make_database()),
               env=reader_env).returncode == 1


def test_a_malformed_recipient_is_exit_2_before_anything_is_written(trading_db: ConnInfo, tmp_path: Path) -> None:
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=str(tmp_path / "b"), BACKUP_LOCK_URL="",
                     BACKUP_ENCRYPT_RECIPIENT="age1notakey")
    result = run("dump", "--json", env=env)
    assert result.returncode == 2 and "BACKUP_ENCRYPT_RECIPIENT" in result.stderr
    assert not (tmp_path / "b").exists()


# --- BACKUP_DIR in a bucket -----------------------------------------------------------------------------

def age_copy(storage: Storage, days: int) -> str:
    """A copy of the newest dump (object and manifest, in every location) that looks ``days`` old."""
    real = catalog.newest(storage)
    copy = catalog.Manifest.from_dict(real.to_dict())
    started = parse_time(real.started_at) - timedelta(days=days, minutes=5)
    copy.id = f"{real.database}-dump-{started.strftime('%Y%m%dT%H%M%SZ')}"
    copy.started_at = copy.finished_at = isoformat(started)
    copy.path = real.path.replace(real.id, copy.id)
    storage.put_bytes(copy.path, storage.read_bytes(real.path))
    catalog.save_new(storage, copy)
    return copy.id


@pytest.mark.slow
def test_backup_dir_in_a_bucket_through_the_cli(
        trading_db: ConnInfo, make_database: Callable[..., ConnInfo], bucket_url: str, s3_env: S3Server,
        tmp_path: Path, verify_url: str) -> None:
    env = base_env(trading_db, bucket_url, verify_url, BACKUP_KEEP_DAILY_DAYS="2", **s3_env.env())
    dumped = run_json("dump", env=env)
    bucket = S3Storage.from_url(bucket_url)
    assert bucket.exists(dumped["path"]) and bucket.exists(f"{dumped['id']}.manifest.json")
    assert hashlib.sha256(bucket.read_bytes(dumped["path"])).hexdigest() == dumped["sha256"]
    listed = run_json("list", env=env)["backups"]
    assert [b["id"] for b in listed] == [dumped["id"]] and listed[0]["locations"] == [bucket.location]
    assert run_json("verify", env=env)["ok"]
    target = make_database()
    assert run_json("restore", dumped["id"], "--target-database-url", url_of(target), env=env)["ok"]
    old = age_copy(bucket, 5)
    pruned = run_json("prune", env=env)
    assert pruned["deleted"] == [old]
    assert not bucket.exists(f"{old}.manifest.json") and not any(o.key.startswith(old) for o in bucket.list())
    assert bucket.exists(dumped["path"])
    # Wrong credentials: exit 1, a clear message, no secret.
    bad = run("list", env=env | {"AWS_SECRET_ACCESS_KEY": "wrongsecret12345"})
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "wrongsecret12345" not in bad.stderr


# --- BACKUP_COPY_TO: local plus off-site ------------------------------------------------------------------

@pytest.mark.slow
def test_copy_to_a_bucket_falls_back_and_verify_names_the_good_location(
        trading_db: ConnInfo, make_database: Callable[..., ConnInfo], bucket_url: str, s3_env: S3Server,
        tmp_path: Path, verify_url: str) -> None:
    local = tmp_path / "b"
    env = base_env(trading_db, str(local), verify_url, BACKUP_COPY_TO=bucket_url, BACKUP_KEEP_DAILY_DAYS="2",
                   **s3_env.env())
    dumped = run_json("dump", env=env)
    bucket = S3Storage.from_url(bucket_url)
    for key in (dumped["path"], f"{dumped['id']}.manifest.json"):
        assert (local / key).is_file() and bucket.exists(key)
    assert bucket.read_bytes(dumped["path"]) == (local / dumped["path"]).read_bytes()

    listed = run_json("list", env=env)["backups"]
    assert [b["id"] for b in listed] == [dumped["id"]]  # once, with both locations
    assert listed[0]["locations"] == [str(local), bucket.location]
    assert run_json("verify", env=env)["ok"]

    # Damage the primary: verify fails naming the good location; restore still works from the copy.
    flip_byte(local / dumped["path"])
    damaged = run_json("verify", env=env, code=1)
    assert f"still good in {bucket.location}" in damaged["problems"][0]
    assert str(local) in damaged["problems"][0] and "checksum" in damaged["problems"][0]
    target = make_database()
    restored = run_json("restore", dumped["id"], "--target-database-url", url_of(target), env=env)
    assert restored["ok"] and restored["rows"] == sum(dumped["tables"].values())

    # Missing from the primary: the same.
    (local / dumped["path"]).unlink()
    missing = run_json("verify", env=env, code=1)
    assert "missing" in missing["problems"][0] and f"still good in {bucket.location}" in missing["problems"][0]
    assert run_json("restore", dumped["id"], "--target-database-url", url_of(make_database()), env=env)["ok"]

    # Prune deletes from both locations.
    time.sleep(1.1)
    newest = run_json("dump", env=env)
    old = age_copy(open_locations(str(local), bucket_url), 5)
    assert (local / f"{old}.manifest.json").exists() and bucket.exists(f"{old}.manifest.json")
    pruned = run_json("prune", env=env)
    assert old in pruned["deleted"]
    for key in (f"{old}.manifest.json", newest["path"].replace(newest["id"], old)):
        assert not (local / key).exists() and not bucket.exists(key)
    assert (local / newest["path"]).exists() and bucket.exists(newest["path"])


@pytest.mark.slow
def test_check_reports_each_location_and_the_keys(tmp_path: Path, s3_env: S3Server) -> None:
    from backup_tasks.cli.pitr import storage_and_keys

    key_file = tmp_path / "backup.key"
    public = write_identity_file(key_file)
    bucket = s3_env.new_bucket()
    settings = Settings.from_env({"BACKUP_DIR": str(tmp_path / "b"), "BACKUP_COPY_TO": f"s3://{bucket}/x",
                                  "BACKUP_ENCRYPT_RECIPIENT": public, "BACKUP_DECRYPT_IDENTITY_FILE": str(key_file)})
    document, lines = storage_and_keys(settings)
    assert document["storage_ok"] and document["keys"]["ok"] and document["keys"]["identity_matches_recipients"]
    assert [(s["role"], s["reachable"], s["writable"]) for s in document["locations"]] == [
        ("primary", True, True), ("copy", True, True)]
    assert not S3Storage.from_url(f"s3://{bucket}/x").list()  # the probe object was removed again
    other = write_identity_file(tmp_path / "other.key")
    broken = Settings.from_env({"BACKUP_DIR": str(tmp_path / "b"), "BACKUP_COPY_TO": "s3://no-such-bucket-bt/x",
                                "BACKUP_ENCRYPT_RECIPIENT": other, "BACKUP_DECRYPT_IDENTITY_FILE": str(key_file)})
    document, lines = storage_and_keys(broken)
    assert not document["storage_ok"] and not document["keys"]["ok"]
    copy = document["locations"][1]
    assert copy["reachable"] is False and "no-such-bucket-bt" in copy["error"]
    assert any("NOT REACHABLE" in line for line in lines)


# --- WAL: archived locally and copied, fetched with fallback ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("copy_kind", ["bucket", "directory"])
def test_wal_push_copies_each_segment_and_wal_fetch_falls_back(
        copy_kind: str, tmp_path: Path, s3_env: S3Server) -> None:
    import os

    from backup_tasks.wal.layout import object_key

    copy_to = f"s3://{s3_env.new_bucket()}/offsite" if copy_kind == "bucket" else str(tmp_path / "copy")
    copy = open_locations(f"{copy_to}/wal")
    archive = tmp_path / "archive"
    archive.mkdir()
    env = worker_env(**s3_env.env())
    name = "000000010000000000000003"
    segment = tmp_path / "pg_wal" / name
    segment.parent.mkdir()
    segment.write_bytes(os.urandom(1 << 20) + bytes(1 << 20))
    push = ["wal-push", "--archive-dir", str(archive), "--copy-to", copy_to, str(segment)]
    assert run(*push, env=env).returncode == 0  # the server's fast path
    local = archive / object_key(name)
    assert copy.read_bytes(object_key(name)) == local.read_bytes()
    assert run(*push, env=env).returncode == 0  # PostgreSQL retries after a crash: same content is fine

    fetch = ["wal-fetch", "--archive-dir", str(archive), "--copy-to", copy_to, name]
    local.unlink()
    assert run(*fetch, str(tmp_path / "restored-1"), env=env).returncode == 0
    assert (tmp_path / "restored-1").read_bytes() == segment.read_bytes()
    # Damaged locally: the copy is used.
    local.write_bytes(copy.read_bytes(object_key(name)))
    flip_byte(local, 100)
    fetched = run(*fetch, str(tmp_path / "restored-2"), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "restored-2").read_bytes() == segment.read_bytes() and "copy" in fetched.stderr
    # Without --copy-to the damage is fatal (restore_command's 200), as before.
    alone = run("wal-fetch", "--archive-dir", str(archive), name, str(tmp_path / "restored-3"), env=env)
    assert alone.returncode == 200 and not (tmp_path / "restored-3").exists()
    # Not archived anywhere: the normal end of recovery (exit 1).
    assert run("wal-fetch", "--archive-dir", str(archive), "--copy-to", copy_to, "000000010000000000000009",
               str(tmp_path / "restored-4"), env=env).returncode == 1
    # A segment missing locally after a local disk loss, present in the copy: fetched from the copy.
    next_name = "000000010000000000000004"
    (tmp_path / "pg_wal" / next_name).write_bytes(os.urandom(1 << 16))
    assert run("wal-push", "--archive-dir", str(archive), "--copy-to", copy_to, str(tmp_path / "pg_wal" / next_name),
               env=env).returncode == 0
    import shutil

    shutil.rmtree(archive)
    assert run("wal-fetch", "--archive-dir", str(archive), "--copy-to", copy_to, next_name,
               str(tmp_path / "restored-5"), env=env).returncode == 0
    assert (tmp_path / "restored-5").read_bytes() == (tmp_path / "pg_wal" / next_name).read_bytes()


@pytest.mark.slow
def test_wal_segments_are_encrypted_when_recipients_are_given(tmp_path: Path, s3_env: S3Server) -> None:
    import os

    from backup_tasks.wal.layout import object_key

    key_file = tmp_path / "wal.key"
    public = write_identity_file(key_file)
    write_identity_file(tmp_path / "wrong.key")
    archive = tmp_path / "archive"
    archive.mkdir()
    copy_to = f"s3://{s3_env.new_bucket()}/offsite"
    env = worker_env(**s3_env.env())
    name = "000000010000000000000007"
    segment = tmp_path / name
    segment.write_bytes(b"WAL-PLAINTEXT-MARKER" * 4096 + os.urandom(1 << 18))
    push = ["wal-push", "--archive-dir", str(archive), "--copy-to", copy_to, "--encrypt-to", public, str(segment)]
    pushed = run(*push, env=env)
    assert pushed.returncode == 0, pushed.stderr
    stored = (archive / object_key(name)).read_bytes()
    assert stored.startswith(AGE_MAGIC) and b"WAL-PLAINTEXT-MARKER" not in stored
    assert open_locations(f"{copy_to}/wal").read_bytes(object_key(name)) == stored
    assert run(*push, env=env).returncode == 0  # a repeated push is recognized without the key

    def fetch(*extra: str, to: str) -> subprocess.CompletedProcess[str]:
        return run("wal-fetch", "--archive-dir", str(archive), "--copy-to", copy_to, *extra, name,
                   str(tmp_path / to), env=env)

    fetched = fetch("--identity-file", str(key_file), to="ok")
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "ok").read_bytes() == segment.read_bytes()
    # No identity or the wrong one: fatal for recovery (200), never garbage and never "end of WAL".
    none = fetch(to="none")
    assert none.returncode == 200 and "BACKUP_DECRYPT_IDENTITY_FILE" in none.stderr
    wrong = fetch("--identity-file", str(tmp_path / "wrong.key"), to="wrong")
    assert wrong.returncode == 200 and "wrong identity" in wrong.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "wrong").exists()
    # A flipped byte in the local ciphertext: age authentication fails there, the copy is used.
    flip_byte(archive / object_key(name))
    fallback = fetch("--identity-file", str(key_file), to="fallback")
    assert fallback.returncode == 0, fallback.stderr
    assert (tmp_path / "fallback").read_bytes() == segment.read_bytes()
    # A malformed key on wal-push is a configuration error (exit 2), nothing archived.
    bad = run("wal-push", "--archive-dir", str(archive), "--encrypt-to", "age1bad", str(tmp_path / "ok"), env=env)
    assert bad.returncode == 2


# --- restore-pitr: a damaged snapshot object in BACKUP_DIR, a good one in BACKUP_COPY_TO --------------------

@pytest.mark.slow
def test_restore_pitr_falls_back_to_the_copy_when_the_snapshot_is_damaged(
        scenario: Scenario, restored_dirs: list[Path]) -> None:
    import shutil

    original = Path(scenario.settings.backup_dir)
    primary, copy = scenario.env.base / "offsite-primary", scenario.env.base / "offsite-copy"
    for destination in (primary, copy):
        shutil.copytree(original, destination, ignore=shutil.ignore_patterns("wal"), dirs_exist_ok=True)
    flip_byte(primary / scenario.snapshot.path)
    settings = replace(scenario.settings, backup_dir=str(primary), wal_archive_dir=str(scenario.env.archive.root))
    data_dir = scenario.env.base / "offsite-restored"
    restored_dirs.append(data_dir)
    result = run_cli("restore-pitr", "--json", "--data-dir", str(data_dir), "--start",
                     env=cli_env(settings, BACKUP_COPY_TO=str(copy)))
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], (result.stdout, result.stderr)
    assert marks(report["port"]) == list(range(1, 171))
    assert "starting again from" in result.stderr and str(copy) in result.stderr
