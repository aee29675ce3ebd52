"""Issue 13 through the commands: backups in an Object Lock bucket, and reading a versioned bucket ``--as-of``.

The attacker of these tests holds the workers' bucket credentials: it can add delete markers and
overwrite objects (what a versioned bucket allows), but cannot remove a locked version.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import botocore.exceptions
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import count_rows
from backup_tasks.storage.locations import open_storage
from backup_tasks.storage.s3 import S3Location
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import worker_env
from tests.support.s3 import S3Server


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BACKUP_TASKS, *args, "--json"], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def ok(*args: str, env: dict[str, str]) -> dict:  # type: ignore[type-arg]
    result = run(*args, env=env)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def rows(db: ConnInfo) -> dict[str, int]:
    with connect(db) as conn:
        return count_rows(conn)


def next_second() -> datetime:
    """A moment strictly between what was written before and what is written after (S3 keeps whole seconds)."""
    time.sleep(1.1)
    moment = datetime.now(UTC)
    time.sleep(1.1)
    return moment


@pytest.mark.slow
def test_as_of_finds_and_restores_backups_deleted_and_overwritten_since(
        trading_db: ConnInfo, make_database: Callable[..., ConnInfo], pg_admin: ConnInfo, s3_env: S3Server) -> None:
    bucket_url = f"s3://{s3_env.new_bucket(versioning=True)}/nightly"
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=bucket_url, BACKUP_LOCK_URL="",
                     VERIFY_DATABASE_URL=url_of(pg_admin.with_dbname("postgres")), **s3_env.env())
    dumped = ok("dump", env=env)
    before = next_second()
    # The attack: the dump "deleted" (a delete marker) and its manifest overwritten.
    where = S3Location.parse(bucket_url)
    client = s3_env.admin_client()
    client.delete_object(Bucket=where.bucket, Key=f"{where.prefix}{dumped['path']}")
    client.put_object(Bucket=where.bucket, Key=f"{where.prefix}{dumped['id']}.manifest.json", Body=b"{}")
    assert ok("list", env=env)["backups"] == []
    assert run("verify", dumped["id"], env=env).returncode != 0

    as_of = ("--as-of", before.isoformat())
    listed = ok("list", *as_of, env=env)["backups"]
    assert [b["id"] for b in listed] == [dumped["id"]]
    verified = ok("verify", dumped["id"], *as_of, env=env)
    assert verified["ok"] and "restore" in verified["checked"]
    target = make_database()
    restored = ok("restore", dumped["id"], "--target-database-url", url_of(target), *as_of, env=env)
    assert restored["ok"] and rows(target) == rows(trading_db)
    # Reading the past never writes: no verdict record was added beside the (overwritten) manifest.
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=where.bucket).get("Contents", [])]
    assert not [k for k in keys if k.endswith(".record.json")]
    # A time before the bucket held anything finds nothing; a time to come is refused.
    assert ok("list", "--as-of", "2000-01-01T00:00:00Z", env=env)["backups"] == []
    future = run("list", "--as-of", "2999-01-01T00:00:00Z", env=env)
    assert future.returncode == 2 and "future" in json.loads(future.stdout)["error"]


@pytest.mark.slow
def test_a_locked_bucket_takes_verifies_and_restores_and_prune_reports_what_is_locked(
        trading_db: ConnInfo, make_database: Callable[..., ConnInfo], pg_admin: ConnInfo, s3_env: S3Server,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bucket_url = f"s3://{s3_env.new_bucket(object_lock=True)}/nightly"
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=bucket_url, BACKUP_LOCK_URL="",
                     VERIFY_DATABASE_URL=url_of(pg_admin.with_dbname("postgres")), BACKUP_OBJECT_LOCK_DAYS="1",
                     BACKUP_KEEP_DAILY_DAYS="2", **s3_env.env())
    first = ok("dump", "--trading-day", "2026-11-20", env=env)
    assert ok("verify", first["id"], env=env)["ok"]
    target = make_database()
    assert ok("restore", first["id"], "--target-database-url", url_of(target), env=env)["ok"]
    assert rows(target) == rows(trading_db)
    where = S3Location.parse(bucket_url)
    client = s3_env.admin_client()
    head = client.head_object(Bucket=where.bucket, Key=f"{where.prefix}{first['path']}")
    assert head["ObjectLockMode"] == "GOVERNANCE" and head["ObjectLockRetainUntilDate"] > datetime.now(UTC)
    records = [o["Key"] for o in client.list_objects_v2(Bucket=where.bucket)["Contents"]
               if o["Key"].endswith(".verification.record.json")]
    assert len(records) == 1  # the verdict: a new (locked) object beside the untouched manifest

    # An older dump (its copy made to look 5 days old, written now: locked for a day) expires with a
    # 2-day retention. Its manifest says the lock has ended; what S3 says of its object decides: prune (and
    # its dry run) report it as locked until that date, an expected state, not a failure.
    monkeypatch.setenv("BACKUP_OBJECT_LOCK_DAYS", "1")  # this process writes the copy: locked too
    bucket = open_storage(bucket_url)
    real = catalog.load(bucket, first["id"])
    old = replace(real, id=real.id.replace("-dump-", "-dump-old"), path=real.path.replace("-dump-", "-dump-old"),
                  started_at=isoformat(datetime.now(UTC) - timedelta(days=5)),
                  finished_at=isoformat(datetime.now(UTC) - timedelta(days=5)), record_keys=[])
    bucket.put_bytes(old.path, bucket.read_bytes(real.path))
    catalog.save_new(bucket, old)
    for command in (("prune", "--dry-run"), ("prune",)):
        report = ok(*command, env=env)
        locked = {entry["backup_id"]: parse_time(entry["locked_until"]) for entry in report["locked"]}
        assert old.id not in report["deleted"] and set(locked) == {old.id}
        assert datetime.now(UTC) < locked[old.id] <= datetime.now(UTC) + timedelta(days=1)
    assert catalog.load(bucket, old.id).path == old.path and bucket.exists(old.path)  # still there, whole
    # The server itself refuses to remove a locked version, whoever asks.
    version = client.list_object_versions(Bucket=where.bucket, Prefix=f"{where.prefix}{old.path}")["Versions"][0]
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=where.bucket, Key=version["Key"], VersionId=version["VersionId"])


def test_as_of_on_a_local_backup_dir_is_a_configuration_error(tmp_path: object) -> None:
    result = run("list", "--as-of", "2026-11-01 10:00", env=worker_env(BACKUP_DIR=str(tmp_path)))
    assert result.returncode == 2 and "versioned s3://" in json.loads(result.stdout)["error"]
