"""Issue 17, "Unchanged": a catalog and WAL archive written by the version before the storage refactor still work.

The fixture (``tests/fixtures/legacy``, see its README) is what commit 7283a27 wrote: two dumps (the older
one 40 days old by its clock), a snapshot of a tiny PostgreSQL 15 cluster, its WAL archive with a named
restore point, and verification records; once plain and once age-encrypted. ``expected.json`` beside each
copy says what the database held. Every test here runs the public CLI (the working tree's, or whatever
``PYTHONPATH`` in the environment points at: ``PYTHONPATH=/tmp/bt-old`` runs them against the old code)
against that catalog in three places:

- ``local``: the files as the old version left them (the WAL archive ``postgres``-owned, 2770/0640);
- ``bucket``: the same objects in a bucket, used as BACKUP_DIR with nothing else left (disaster recovery);
- ``locked-bucket``: the same in a bucket with Object Lock (so versioning), each object locked for a day as
  the old version wrote them with ``BACKUP_OBJECT_LOCK_DAYS=1``.

The tests only read the committed files: they copy or upload them and never regenerate them.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.s3 import S3Server

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "legacy"
VARIANTS = ("plain", "encrypted")
LOCATIONS = ("local", "bucket", "locked-bucket")
PREFIX = "nightly/aitrapp"
#: How the generator read the database: the same queries give the same text here.
QUERIES = {"trades": "SELECT id, symbol, qty, price::text FROM trades ORDER BY id",
           "marks": "SELECT id, phase, (at AT TIME ZONE 'UTC')::text FROM marks ORDER BY id"}
PG_CTL = "/usr/lib/postgresql/15/bin/pg_ctl"


@cache
def expected(variant: str) -> dict[str, Any]:
    return json.loads((FIXTURE / variant / "expected.json").read_text())


@dataclass
class Legacy:
    """The old catalog in one place, and the environment the CLI needs to read it there."""

    variant: str
    location: str
    backup_dir: str
    env: dict[str, str]
    base: Path  # a directory the postgres OS user can enter: restored data directories go here
    expected: dict[str, Any]

    def cli(self, *args: str, timeout: float = 300) -> tuple[int, dict[str, Any]]:
        """``backup-tasks ARGS --json``: the exit status and its one JSON document."""
        result = subprocess.run([BACKUP_TASKS, *args, "--json"], env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False, cwd="/")
        try:
            document = json.loads(result.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"backup-tasks {' '.join(args)}: no JSON ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}") from None
        return result.returncode, document

    def ok(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        code, document = self.cli(*args, timeout=timeout)
        assert code == 0, (args, document)
        return document


def reachable_dir() -> Path:
    """A fresh directory the postgres OS user can enter (pytest's tmp_path under /tmp/pytest-of-root is not)."""
    base = Path(tempfile.mkdtemp(prefix="bt-test-legacy-"))
    base.chmod(0o711)
    return base


def install_locally(variant: str, backup_dir: Path) -> None:
    """The fixture's files with the modes and owners the old version gave them (git keeps neither, nor empty dirs)."""
    layout = expected(variant)["layout"]
    source = FIXTURE / variant / "backups"
    for relative, entry in layout.items():
        path = backup_dir / relative
        if entry["type"] == "dir":
            path.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copyfile(source / relative, path)
    for relative, entry in layout.items():
        path = backup_dir / relative
        if os.geteuid() == 0:  # otherwise every file is ours, as PostgreSQL then runs as us too
            os.chown(path, pwd.getpwnam(entry["owner"]).pw_uid, grp.getgrnam(entry["group"]).gr_gid)
        path.chmod(int(entry["mode"], 8))


def upload(server: S3Server, bucket: str, variant: str, *, locked: bool) -> None:
    """The objects the old version wrote to a bucket (``bucket_keys``), with the lock it set when asked to."""
    client = server.admin_client()
    until = datetime.now(UTC) + timedelta(days=1)
    for key in expected(variant)["bucket_keys"]:
        body = (FIXTURE / variant / "backups" / key).read_bytes()
        extra: dict[str, Any] = {"ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode()}
        if locked:
            extra |= {"ObjectLockMode": "GOVERNANCE", "ObjectLockRetainUntilDate": until}
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{key}", Body=body, **extra)


def cli_env(backup_dir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BACKUP_", "CELERY_", "SENTRY_", "WAL_", "AWS_", "RESTORE_"))}
    env.pop("DATABASE_URL", None)
    env |= {"BACKUP_DIR": backup_dir, "CELERY_BROKER_URL": "memory://", "BACKUP_TIMEZONE": "UTC"}
    return env | extra


def ids(param: tuple[str, str]) -> str:
    return f"{param[0]}-{param[1]}"


@pytest.fixture(params=[(v, loc) for v in VARIANTS for loc in LOCATIONS], ids=ids)
def legacy(request: pytest.FixtureRequest) -> Iterator[Legacy]:
    variant, location = request.param
    base = reachable_dir()
    try:
        extra: dict[str, str] = {}
        if expected(variant)["encrypted"]:
            identity = base / "backup.key"  # root:postgres 0640: the server reads it as restore_command
            shutil.copyfile(FIXTURE / "keys" / "test-only.age-identity.txt", identity)
            if os.geteuid() == 0:
                os.chown(identity, 0, grp.getgrnam("postgres").gr_gid)
            identity.chmod(0o640)
            extra["BACKUP_DECRYPT_IDENTITY_FILE"] = str(identity)
        if location == "local":
            install_locally(variant, base / "backups")
            backup_dir = str(base / "backups")
        else:
            server: S3Server = request.getfixturevalue("s3_server")
            locked = location == "locked-bucket"
            bucket = server.new_bucket(object_lock=locked)
            upload(server, bucket, variant, locked=locked)
            backup_dir = f"s3://{bucket}/{PREFIX}"  # the old BACKUP_COPY_TO; no WAL_ARCHIVE_DIR
            extra |= server.env()
            if locked:
                extra |= {"BACKUP_OBJECT_LOCK_DAYS": "1", "BACKUP_OBJECT_LOCK_MODE": "GOVERNANCE"}
        yield Legacy(variant, location, backup_dir, cli_env(backup_dir, **extra), base, expected(variant))
    finally:
        for data_dir in base.glob("restored-*"):
            if (data_dir / "postmaster.pid").exists():
                subprocess.run(["runuser", "-u", "postgres", "--", PG_CTL, "-D", str(data_dir), "-m", "immediate",
                                "stop"], capture_output=True, check=False, cwd="/")
        shutil.rmtree(base, ignore_errors=True)


def rows(url: str) -> dict[str, list[list[Any]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return {table: [list(row) for row in conn.execute(sql).fetchall()] for table, sql in QUERIES.items()}


#: Fields a later version added to every manifest it reads: null for backups from before them (additive JSON).
ADDED_SINCE = {"cluster_objects", "unlogged_tables", "parent", "chain"}


def stable(backup: dict[str, Any]) -> dict[str, Any]:
    """What a manifest says about the backup itself (not where it is listed from, not fields added since)."""
    assert all(backup.get(k) is None for k in ADDED_SINCE), "an old backup gains no facts it never had"
    return {k: v for k, v in backup.items() if k != "locations" and k not in ADDED_SINCE}


# --- read, verify, restore, prune: quick -------------------------------------------------------------------

@pytest.mark.slow
def test_list_shows_the_old_backups_as_the_old_version_did(legacy: Legacy) -> None:
    listed = legacy.ok("list")
    old = legacy.expected["old_outputs"]["list"]
    assert [b["id"] for b in listed["backups"]] == [b["id"] for b in old["backups"]]
    assert [stable(b) for b in listed["backups"]] == [stable(b) for b in old["backups"]]
    assert all(b["verification"]["ok"] for b in listed["backups"])  # the old verdicts (records) are read
    assert [b["locations"] for b in listed["backups"]] == [[legacy.backup_dir]] * 3
    # The range each snapshot restores to, computed now from the archive, is the one the old version computed;
    # the keys added since (additive JSON) say the timeline and the snapshot's generation (system, major).
    added = {"timeline", "system_identifier", "major"}
    assert [{k: v for k, v in r.items() if k not in added} for r in listed["restorable"]] == old["restorable"]
    assert all(added <= r.keys() for r in listed["restorable"])
    assert {r["timeline"] for r in listed["restorable"]} == {1}
    snapshots = {b["id"]: b for b in listed["backups"] if b["kind"] == "snapshot"}
    of_snapshot = [snapshots[r["backup_id"]] for r in listed["restorable"]]
    assert [(r["system_identifier"], r["major"]) for r in listed["restorable"]] == \
        [(s["system_identifier"], int(s["server_version"].split(".")[0])) for s in of_snapshot]
    assert all(r["major"] == 15 and r["system_identifier"] for r in listed["restorable"])
    assert listed["restorable"][0]["wal_gap"] is None


@pytest.mark.slow
def test_verify_passes_on_the_old_dump(legacy: Legacy) -> None:
    newer = legacy.expected["newer_dump"]
    report = legacy.ok("verify", newer)
    assert report["ok"] and report["problems"] == [], report


@pytest.mark.slow
def test_restore_gives_exactly_the_recorded_rows(legacy: Legacy, make_database: Callable[..., Any]) -> None:
    for backup_id, content in legacy.expected["dumps"].items():
        target = url_of(make_database())
        report = legacy.ok("restore", backup_id, "--target-database-url", target)
        assert report["ok"], report
        assert rows(target) == content, backup_id


@pytest.mark.slow
def test_prune_dry_run_says_what_retention_says(legacy: Legacy) -> None:
    report = legacy.ok("prune", "--dry-run")
    old = legacy.expected["old_outputs"]["prune_dry_run"]
    older, newer, snapshot = (legacy.expected[k] for k in ("older_dump", "newer_dump", "snapshot"))
    assert report["dry_run"] is True
    # The same decisions as the old version's; the older dump's reason gives its age, which grows every day.
    assert [{**d, "reason": None} if d["backup_id"] == older else d for d in report["decisions"]] == \
        [{**d, "reason": None} if d["backup_id"] == older else d for d in old["decisions"]]
    assert {d["backup_id"]: d["keep"] for d in report["decisions"]} == {older: False, newer: True, snapshot: True}
    assert re.fullmatch(r"\d+ days old, retention is 7 days", report["decisions"][0]["reason"])
    if legacy.location == "locked-bucket":
        # Expired, but its objects are locked for a day: kept and reported, never attempted.
        assert report["deleted"] == [] and [e["backup_id"] for e in report["locked"]] == [older]
        until = datetime.fromisoformat(report["locked"][0]["locked_until"].replace("Z", "+00:00"))
        assert timedelta(hours=23) < until - datetime.now(UTC) <= timedelta(days=1)
    else:
        assert report["deleted"] == [older] and report["locked"] == []
    expirable = old["wal_deleted"]  # before the snapshot's first segment
    assert expirable and all(name < legacy.expected["snapshot_start_segment"] for name in expirable)
    if legacy.location == "local":
        assert report["wal_deleted"] == expirable
    else:  # WAL in a bucket used as BACKUP_DIR: never more than retention allows
        assert set(report["wal_deleted"]) <= set(expirable)


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [(v, "locked-bucket") for v in VARIANTS], ids=ids, indirect=True)
def test_prune_keeps_what_the_lock_holds(legacy: Legacy) -> None:
    report = legacy.ok("prune")
    older = legacy.expected["older_dump"]
    assert report["deleted"] == [] and [e["backup_id"] for e in report["locked"]] == [older]
    assert legacy.ok("list")["backups"][0]["id"] == older  # still listed, still whole
    assert legacy.ok("verify", older)["ok"]


# --- point-in-time recovery from the old snapshot and WAL: slow --------------------------------------------

def restore_pitr(legacy: Legacy, *target: str) -> dict[str, Any]:
    data_dir = legacy.base / f"restored-{uuid.uuid4().hex[:8]}"
    report = legacy.ok("restore-pitr", "--data-dir", str(data_dir), *target, "--start", timeout=600)
    assert report["ok"], report
    return report


def marks_on(legacy: Legacy, port: int) -> list[list[Any]]:
    return rows(f"postgresql://postgres@127.0.0.1:{port}/{legacy.expected['database']}")["marks"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["time", "name"])
def test_restore_pitr_gives_exactly_the_marks_up_to_the_target(legacy: Legacy, target: str) -> None:
    want = legacy.expected
    if target == "time":
        report = restore_pitr(legacy, "--target-time", want["target_time"])
        ids = want["marks_at_target_time"]
    else:
        report = restore_pitr(legacy, "--target-name", want["restore_point"])
        ids = want["marks_at_restore_point"]
    assert marks_on(legacy, report["port"]) == [m for m in want["final_content"]["marks"] if m[0] in ids]
    if legacy.location != "local":
        assert "--archive-url" in report["recovery_settings"]["restore_command"]


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [(v, loc) for v in VARIANTS for loc in ("local", "locked-bucket")], ids=ids,
                         indirect=True)
def test_verify_snapshot_recovers_the_old_archive(legacy: Legacy) -> None:
    """Recovery to the restore point (the newer dump's row counts), then to the end of the archive, amcheck."""
    report = legacy.ok("verify", "--snapshot", legacy.expected["snapshot"], timeout=600)
    assert report["ok"] and report["problems"] == [], report
