"""Issue 11: disaster recovery from the bucket alone (no local catalog, no local WAL archive).

The deployment archives locally with BACKUP_COPY_TO=s3://...; after the disaster the new host has
the package, BACKUP_DIR=<the old BACKUP_COPY_TO> (no WAL_ARCHIVE_DIR) and the AWS credentials.
Also the read-ahead of ``wal-fetch --archive-url`` on its own: spooled objects verified, damaged or
misplaced ones fetched again, no spool left at the end, no boto3 import for a spooled segment.
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import botocore.exceptions
import pytest

from backup_tasks.errors import StorageReadOnly
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.settings import Settings
from backup_tasks.storage.objectlock import ObjectLock
from backup_tasks.storage.s3 import S3Storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import coverage
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import segment_name
from backup_tasks.wal.prefetch import SPOOL_PREFIX, Spool
from backup_tasks.wal.remote import archive_at, archive_for_reading
from backup_tasks.wal.restore_points import create_restore_point, restore_points
from tests.support.crypto import write_identity_file
from tests.support.paths import BACKUP_TASKS, ROOT
from tests.support.pitr import PitrEnv, cli_env, insert, marks, reachable_dir, run_cli, stop_restored
from tests.support.processes import worker_env
from tests.support.s3 import S3Server

MIB = 1 << 20


def fake_segment(segno: int, size: int = MIB) -> bytes:
    """A segment whose first page header carries its WAL position and size (what wal-fetch checks)."""
    header = struct.pack("<HHIQI4xQI", 0xD110, 0x0002, 1, segno * size, 0, 7_000_000_000_000_000_000, size)
    body = bytes((segno * 7 + i) % 251 for i in range(4096)) * (size // 4096)
    return header + body[len(header):]


@pytest.fixture
def bucket_archive(tmp_path: Path, s3_env: S3Server) -> Iterator[tuple[str, list[str], dict[str, bytes]]]:
    """Twelve 1 MiB segments pushed with BACKUP_COPY_TO to a bucket, the local archive then deleted."""
    copy_to = f"s3://{s3_env.new_bucket()}/prod"
    archive = WalArchive.in_directory(tmp_path / "archive", copy_to)
    archive.ensure()
    contents: dict[str, bytes] = {}
    for segno in range(1, 13):
        name = segment_name(1, segno, MIB)
        source = tmp_path / "pg_wal_src" / name
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(fake_segment(segno))
        archive.push(source)
        contents[name] = source.read_bytes()
    shutil.rmtree(tmp_path / "archive")
    yield f"{copy_to}/wal", list(contents), contents


def wal_fetch(url: str, name: str, destination: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BACKUP_TASKS, "wal-fetch", "--archive-url", url, name, str(destination)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_the_bucket_is_read_as_an_archive(bucket_archive: tuple[str, list[str], dict[str, bytes]],
                                         tmp_path: Path) -> None:
    """The same ``WalArchive``, over the bucket's ``wal/`` opened read-only: one listing, one ranged GET a trailer."""
    url, names, _contents = bucket_archive
    settings = Settings(backup_dir=url.removesuffix("/wal"))
    archive = archive_for_reading(settings)
    assert archive.location == url and archive.root is None and archive.copy is None
    assert archive.features.read_only  # writes are refused before they reach the bucket
    assert settings.wal_archive_url == url
    with pytest.raises(Exception, match="WAL_ARCHIVE_DIR"):
        _ = settings.wal_archive  # writers still need a local archive
    requests: list[str] = []
    archive.primary.inner.client.meta.events.register(  # type: ignore[attr-defined]
        "before-call.s3", lambda model, params, **_: requests.append(
            f"{model.name}{' range' if 'Range' in params.get('headers', {}) else ''}"))
    assert archive.segment_names() == names and archive.exists(names[3])
    assert not archive.exists("000000010000000000000FFF")
    assert archive.trailer(names[-1]).size == MIB
    cov = coverage(archive, names[0], MIB)
    assert cov.end_segment == names[-1] and cov.segments == 12 and cov.gap is None
    assert requests == ["ListObjectsV2", "GetObject range"], "one listing, kept; a trailer is one ranged GET"
    (tmp_path / names[0]).write_bytes(fake_segment(1))
    with pytest.raises(StorageReadOnly):
        archive.push(tmp_path / names[0])
    local = archive_for_reading(Settings(backup_dir="/x"))
    assert local.root == Path("/x/wal") and not local.features.read_only


@pytest.mark.slow
def test_wal_fetch_reads_ahead_into_a_verified_spool(
        bucket_archive: tuple[str, list[str], dict[str, bytes]], tmp_path: Path, s3_env: S3Server) -> None:
    url, names, contents = bucket_archive
    env = worker_env(**s3_env.env())
    pg_wal = tmp_path / "data" / "pg_wal"
    pg_wal.mkdir(parents=True)
    destination = pg_wal / "RECOVERYXLOG"
    spool = Spool.beside(destination, url)

    first = wal_fetch(url, names[0], destination, env)
    assert first.returncode == 0, first.stderr
    assert destination.read_bytes() == contents[names[0]]
    wait_for(lambda: spool.spooled() == names[1:9])  # N+1..N+8, fetched in the background

    # A damaged spooled object is discarded and the segment fetched again.
    damaged = bytearray(spool.path(names[1]).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    spool.path(names[1]).write_bytes(bytes(damaged))
    second = wal_fetch(url, names[1], destination, env)
    assert second.returncode == 0, second.stderr
    assert destination.read_bytes() == contents[names[1]] and "damaged prefetched" in second.stderr

    # Another segment's (intact) object under this name: its own trailer matches, its page header does not.
    wait_for(lambda: names[3] in spool.spooled() and names[2] in spool.spooled())
    spool.path(names[2]).write_bytes(spool.path(names[3]).read_bytes())
    third = wal_fetch(url, names[2], destination, env)
    assert third.returncode == 0, third.stderr
    assert destination.read_bytes() == contents[names[2]] and "another segment" in third.stderr

    # A spooled segment is handed over without importing boto3.
    wait_for(lambda: names[3] in spool.spooled())
    probe = ("import json, sys\nfrom backup_tasks.entry import main\n"
             f"code = main(['wal-fetch', '--archive-url', {url!r}, {names[3]!r}, {str(destination)!r}])\n"
             "print(json.dumps({'code': code, 'boto3': 'boto3' in sys.modules,\n"
             "                  'botocore': 'botocore' in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                            check=False, cwd=ROOT)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"code": 0, "boto3": False, "botocore": False}, \
        result.stderr
    assert destination.read_bytes() == contents[names[3]]
    assert len(spool.spooled()) <= 9  # bounded: N..N+8 at most

    # The end of the archive (exit 1): the spool is removed, nothing else is left in pg_wal.
    end = wal_fetch(url, segment_name(1, 13, MIB), pg_wal / "RECOVERYXLOG.next", env)
    assert end.returncode == 1, end.stderr
    wait_for(lambda: not any(p.name.startswith(SPOOL_PREFIX) for p in pg_wal.iterdir()))
    assert sorted(p.name for p in pg_wal.iterdir()) == ["RECOVERYXLOG"]


@pytest.mark.slow
def test_history_files_gaps_and_unreadable_buckets(
        bucket_archive: tuple[str, list[str], dict[str, bytes]], tmp_path: Path, s3_env: S3Server) -> None:
    url, names, _contents = bucket_archive
    env = worker_env(**s3_env.env())
    S3Storage.from_url(url).delete(object_key(names[5]))
    gap = wal_fetch(url, names[5], tmp_path / "RECOVERYXLOG", env)
    assert gap.returncode == 200 and "gap" in gap.stderr  # later segments exist: fatal, not the end of WAL
    assert coverage(archive_at(url), names[0], MIB).gap == names[5]
    missing = wal_fetch(url, "00000002.history", tmp_path / "RECOVERYHISTORY", env)
    assert missing.returncode == 1 and not (tmp_path / "RECOVERYHISTORY").exists()
    bad = wal_fetch("s3://no-such-bucket-bt/prod/wal", segment_name(1, 1, MIB), tmp_path / "x", env)
    assert bad.returncode == 200 and "Traceback" not in bad.stderr  # unreadable: fatal, never "end of WAL"
    assert not any(p.name.startswith(SPOOL_PREFIX) for p in tmp_path.iterdir())


@pytest.mark.slow
def test_encrypted_wal_is_read_ahead_and_decrypted_on_hand_over(tmp_path: Path, s3_env: S3Server) -> None:
    key_file = tmp_path / "wal.key"
    public = write_identity_file(key_file)
    copy_to = f"s3://{s3_env.new_bucket()}/prod"
    archive = WalArchive.in_directory(tmp_path / "archive", copy_to, recipients=(public,))
    archive.ensure()
    names = [segment_name(1, segno, MIB) for segno in range(1, 4)]
    for segno, name in enumerate(names, start=1):
        (tmp_path / name).write_bytes(fake_segment(segno))
        archive.push(tmp_path / name)
    shutil.rmtree(tmp_path / "archive")
    env = worker_env(**s3_env.env())
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    url = f"{copy_to}/wal"

    def fetch(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BACKUP_TASKS, "wal-fetch", "--archive-url", url, *extra, name,
                               str(pg_wal / "RECOVERYXLOG")], env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    assert fetch(names[0], "--identity-file", str(key_file)).returncode == 0
    spool = Spool.beside(pg_wal / "RECOVERYXLOG", url)
    wait_for(lambda: spool.spooled() == names[1:])
    # Without the identity a spooled (encrypted) object is never handed over: fatal, not "end of WAL".
    refused = fetch(names[1])
    assert refused.returncode == 200 and "BACKUP_DECRYPT_IDENTITY_FILE" in refused.stderr
    for segno, name in enumerate(names[1:], start=2):
        assert fetch(name, "--identity-file", str(key_file)).returncode == 0
        assert (pg_wal / "RECOVERYXLOG").read_bytes() == fake_segment(segno)
    assert fetch(segment_name(1, 9, MIB), "--identity-file", str(key_file)).returncode == 1
    wait_for(lambda: not spool.dir.exists())


@pytest.mark.slow
def test_the_full_cli_reads_the_bucket_alone_too(tmp_path: Path, s3_env: S3Server) -> None:
    """``wal-fetch --json --archive-url`` (not the form PostgreSQL runs) takes the argparse path: same answer."""
    copy_to = f"s3://{s3_env.new_bucket()}/prod"
    archive = WalArchive.in_directory(tmp_path / "archive", copy_to)
    archive.ensure()
    name = segment_name(1, 1, MIB)
    (tmp_path / name).write_bytes(fake_segment(1))
    archive.push(tmp_path / name)
    shutil.rmtree(tmp_path / "archive")
    env, url, destination = worker_env(**s3_env.env()), f"{copy_to}/wal", tmp_path / "RECOVERYXLOG"

    def fetch(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BACKUP_TASKS, "wal-fetch", "--json", *argv], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    done = fetch("--archive-url", url, "--prefetch", "0", name, str(destination))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": True, "name": name, "bytes": MIB}
    assert destination.read_bytes() == fake_segment(1)
    missing = fetch("--archive-url", url, segment_name(1, 2, MIB), str(destination))
    assert missing.returncode == 1 and json.loads(missing.stdout)["missing"] is True
    mixed = fetch("--archive-url", url, "--archive-dir", str(tmp_path), name, str(destination))
    assert mixed.returncode == 2 and "without --archive-dir" in mixed.stdout


# --- end to end: the server is gone, only the bucket is left ----------------------------------------------

def archived_in_bucket(conninfo: object, name: str, timeout: float = 60) -> None:
    """Wait until archive_command succeeded for ``name`` (its copy in the bucket included)."""
    deadline = time.monotonic() + timeout
    while True:
        with connect(conninfo) as conn:  # type: ignore[arg-type]
            last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
        if last and last[8:] >= name[8:]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} was not archived within {timeout}s")
        time.sleep(0.1)


def switch(conninfo: object) -> str:
    with connect(conninfo) as conn:  # type: ignore[arg-type]
        conn.execute("SELECT txid_current()")
        return str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])


@pytest.mark.slow
def test_restore_pitr_from_the_bucket_alone(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a bucket with Object Lock (issue 13): the snapshot, its manifest and the WAL copy are all locked."""
    env = PitrEnv(reachable_dir("bt-test-dr-"))
    bucket = s3_env.new_bucket(object_lock=True)
    lock = ObjectLock(days=1)
    for name, value in lock.environment().items():  # this process takes the snapshot: it locks what it writes
        monkeypatch.setenv(name, value)
    copy_to = f"s3://{bucket}/prod"
    data_dir = env.base / "new-host" / "data"
    second_dir = env.base / "new-host" / "data-as-of"
    try:
        command = archive_command(env.command, env.archive.root, copy_to, lock=lock)
        cluster = ThrowawayCluster(settings={"wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on",
                                             "archive_command": shlex.quote(command), "archive_timeout": "0"})
        with cluster as source:
            conninfo = source.conninfo()
            settings = env.for_cluster(source, copy_to=copy_to)
            with connect(conninfo) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
            take_snapshot(settings)
            insert(conninfo, 1, 60, "first")
            switch(conninfo)
            insert(conninfo, 61, 100, "first")
            with connect(conninfo) as conn:
                noted = str(conn.execute("SELECT now()::text").fetchone()[0])
            mark = create_restore_point(settings, "dr-mark", switch_wal=False)
            insert(conninfo, 101, 150, "second")
            switch(conninfo)
            insert(conninfo, 151, 170, "third")
            archived_in_bucket(conninfo, switch(conninfo))
        # The disaster: the host, its backup directory and its WAL archive are gone.
        shutil.rmtree(env.backup_dir)
        data_dir.parent.mkdir()
        data_dir.parent.chmod(0o711)
        fresh = Settings(backup_dir=copy_to)  # the old BACKUP_COPY_TO; no WAL_ARCHIVE_DIR, no DATABASE_URL
        # The restore point's record went to the bucket too: --target-name works from there alone.
        assert restore_points(archive_at(f"{copy_to}/wal")) == [mark]
        listed = run_cli("list", "--json", env=cli_env(fresh))
        assert listed.returncode == 0, listed.stderr
        restorable = json.loads(listed.stdout)["restorable"]
        assert len(restorable) == 1 and restorable[0]["wal_gap"] is None and restorable[0]["wal_segments"] >= 3
        result = run_cli("restore-pitr", "--json", "--data-dir", str(data_dir), "--target-time", noted, "--start",
                         env=cli_env(fresh))
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["ok"], (result.stdout, result.stderr)
        assert marks(report["port"]) == list(range(1, 101))
        assert "--archive-url" in report["recovery_settings"]["restore_command"]
        assert "recovery_target_time" in report["recovery_settings"]
        assert not list((data_dir / "pg_wal").glob(f"{SPOOL_PREFIX}*"))  # the read-ahead spool was cleaned up
        verified = run_cli("verify", "--snapshot", "--json", env=cli_env(fresh) | lock.environment())  # bucket WAL
        assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], (verified.stdout, verified.stderr)

        # Worse: someone with the bucket's credentials "deleted" the snapshot's manifest and every archived
        # segment (delete markers in a versioned bucket). --as-of reads the bucket as it was before that.
        clean = datetime.now(UTC)
        time.sleep(1.1)  # S3 keeps whole seconds: the attack lands in a later second than ``clean``
        client = s3_env.admin_client()
        for entry in client.list_objects_v2(Bucket=bucket, Prefix="prod/")["Contents"]:
            if entry["Key"].startswith("prod/wal/") or entry["Key"].endswith(".manifest.json"):
                client.delete_object(Bucket=bucket, Key=entry["Key"])
        after = json.loads(run_cli("list", "--json", env=cli_env(fresh)).stdout)
        assert after["backups"] == [] and "restorable" not in after
        again = run_cli("restore-pitr", "--json", "--data-dir", str(second_dir), "--target-time", noted, "--start",
                        "--as-of", clean.isoformat(), env=cli_env(fresh))
        recovered = json.loads(again.stdout)
        assert again.returncode == 0 and recovered["ok"], (again.stdout, again.stderr)
        assert marks(recovered["port"]) == list(range(1, 101))
        assert "--as-of" in recovered["recovery_settings"]["restore_command"]
        # What the attacker could not do: remove a locked version.
        version = client.list_object_versions(Bucket=bucket, Prefix="prod/wal/")["Versions"][0]
        assert version["Key"].startswith("prod/wal/")
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
            client.delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        head = client.head_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        assert head["ObjectLockMode"] == "GOVERNANCE" and head["ObjectLockRetainUntilDate"] > datetime.now(UTC)
    finally:
        stop_restored([data_dir, second_dir])
        shutil.rmtree(env.base, ignore_errors=True)


def test_object_keys_are_the_local_archive_keys() -> None:
    # The bucket-backed view relies on wal-push copying under the same keys as the local archive.
    assert object_key("000000010000000000000003") == "0000000100000000/000000010000000000000003.zst"
