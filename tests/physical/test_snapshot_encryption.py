"""Encrypted snapshots: every stored object is age ciphertext, and only the right identity restores them.

Also: a local BACKUP_COPY_TO gets its ``wal`` directory prepared like the WAL archive itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.physical.drill import pitr_drill
from backup_tasks.postgres.cluster import as_server_user, server_uid_gid
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.streams.crypto import AGE_MAGIC
from backup_tasks.wal.layout import DIR_MODE
from backup_tasks.wal.setup import prepare_archive
from tests.support.crypto import write_identity_file
from tests.support.pitr import PitrEnv, Scenario, cli_env, insert, marks, reachable_dir, run_cli, switch_and_wait
from tests.support.require import unavailable

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class Encrypted:
    pitr: Scenario
    identity: Path
    public: str
    wrong_identity: Path


@pytest.fixture(scope="module")
def scenario() -> Iterator[Encrypted]:
    """An encrypted snapshot (taken through the CLI); rows 1-100; note the time; rows 101-150; switch WAL."""
    env = PitrEnv(reachable_dir("bt-test-snapenc-"))
    try:
        identity, wrong = env.base / "backup.key", env.base / "other.key"
        public = write_identity_file(identity)
        write_identity_file(wrong)
        with env.archiving_cluster() as source:
            settings = env.for_cluster(source, encrypt_recipients=(public,), decrypt_identity_file=identity)
            conninfo = source.conninfo()
            with connect(conninfo) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
            taken = run_cli("snapshot", "--json", env=cli_env(settings, BACKUP_ENCRYPT_RECIPIENT=public))
            assert taken.returncode == 0, taken.stderr + taken.stdout
            snapshot = catalog.load(open_storage(settings.backup_dir), json.loads(taken.stdout)["id"])
            insert(conninfo, 1, 100, "first")
            with connect(conninfo) as conn:
                noted = str(conn.execute("SELECT now()::text").fetchone()[0])
            insert(conninfo, 101, 150, "second")
            switch_and_wait(conninfo, env.archive)
            yield Encrypted(Scenario(env, source, settings, snapshot, noted, ""), identity, public, wrong)
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


def restore_pitr(enc: Encrypted, dirs: list[Path], *args: str,
                 identity: Path | None) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    data_dir = enc.pitr.env.base / f"restored-{len(dirs)}-{random.randrange(1 << 30)}"
    dirs.append(data_dir)
    extra = {"BACKUP_DECRYPT_IDENTITY_FILE": str(identity)} if identity is not None else {}
    result = run_cli("restore-pitr", "--json", "--data-dir", str(data_dir), *args,
                     env=cli_env(enc.pitr.settings, **extra))
    return result, json.loads(result.stdout) if result.stdout.strip() else {}, data_dir


@pytest.mark.slow
def test_every_stored_object_is_age_ciphertext_described_by_the_manifest(scenario: Encrypted) -> None:
    snapshot = scenario.pitr.snapshot
    assert snapshot.encryption == {"format": "age", "recipients": [scenario.public]}
    assert {info["role"] for info in snapshot.files.values()} >= {"base", "wal", "backup_manifest"}
    backup_dir = Path(scenario.pitr.settings.backup_dir)
    for key, info in snapshot.files.items():
        assert key.endswith(".age"), key
        stored = (backup_dir / key).read_bytes()
        assert stored.startswith(AGE_MAGIC), key
        assert not stored.startswith(ZSTD_MAGIC) and b"ustar" not in stored and b"PostgreSQL-Backup-Manifest" \
            not in stored, f"{key} is readable without the key"
        assert len(stored) == info["size"], key
        assert hashlib.sha256(stored).hexdigest() == info["sha256"], key
    document = (backup_dir / catalog.manifest_key(snapshot.id)).read_text()
    assert "AGE-SECRET-KEY" not in document.upper()


@pytest.mark.slow
def test_restore_to_a_noted_time_with_the_right_identity(scenario: Encrypted, restored_dirs: list[Path]) -> None:
    result, report, _ = restore_pitr(scenario, restored_dirs, "--target-time", scenario.pitr.noted_time, "--start",
                                     identity=scenario.identity)
    assert result.returncode == 0, result.stderr + result.stdout
    assert report["ok"] and report["snapshot_id"] == scenario.pitr.snapshot.id
    assert marks(report["port"]) == list(range(1, 101))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["wrong", "missing"])
def test_the_wrong_or_a_missing_identity_is_refused_before_anything_is_unpacked(
        scenario: Encrypted, restored_dirs: list[Path], which: str) -> None:
    identity = scenario.wrong_identity if which == "wrong" else None
    result, report, data_dir = restore_pitr(scenario, restored_dirs, "--target-time", scenario.pitr.noted_time,
                                            identity=identity)
    assert result.returncode == 1, result.stderr + result.stdout
    assert report["ok"] is False and report["error_type"] == "IdentityUnusable", report
    if which == "wrong":
        assert "wrong identity" in report["error"] and str(scenario.wrong_identity) in report["error"]
    else:
        assert "BACKUP_DECRYPT_IDENTITY_FILE" in report["error"]
    assert "AGE-SECRET-KEY" not in (result.stdout + result.stderr).upper()
    assert not data_dir.exists() or not any(data_dir.iterdir()), "nothing may be unpacked without the key"


@pytest.mark.slow
def test_pitr_drill_decrypts_the_snapshot(scenario: Encrypted) -> None:
    result = pitr_drill(scenario.pitr.settings, seed=7)
    assert result.ok, result.problems
    assert result.snapshot_id == scenario.pitr.snapshot.id and result.tables >= 1


def test_a_local_copy_location_gets_a_wal_directory_the_server_user_can_write() -> None:
    base = reachable_dir("bt-test-copywal-")
    try:
        settings = Settings(backup_dir=str(base / "backups"), copy_to=str(base / "copy"), broker_url="memory://",
                            lock_url=None)
        _archive, notes = prepare_archive(settings)
        copy_wal = base / "copy" / "wal"
        assert any(str(copy_wal) in note for note in notes), notes
        ids = server_uid_gid()
        if ids is None:
            unavailable("no postgres OS user here: nothing to hand the directory to",
                        "apt-get install postgresql (scripts/bootstrap.sh installs it)")
        info = copy_wal.stat()
        assert (info.st_uid, info.st_gid) == ids and stat.S_IMODE(info.st_mode) == DIR_MODE
        assert info.st_mode & stat.S_ISGID, "setgid: files below inherit the server user's group"
        probe = copy_wal / "probe"
        subprocess.run([*as_server_user(), "touch", str(probe)], check=True, cwd="/")
        assert probe.stat().st_gid == ids[1]
        prepare_archive(settings)  # idempotent: a second run changes nothing and does not fail
        assert stat.S_IMODE(copy_wal.stat().st_mode) == DIR_MODE and os.path.exists(probe)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_verify_snapshot_decrypts_with_the_identity_and_refuses_without_it(scenario: Encrypted) -> None:
    settings = scenario.pitr.settings
    good = run_cli("verify", "--snapshot", "--json", env=cli_env(
        settings, BACKUP_DECRYPT_IDENTITY_FILE=str(scenario.identity)), timeout=600)
    assert good.returncode == 0, good.stderr + good.stdout
    document = json.loads(good.stdout)
    assert document["ok"] is True and {"sha256", "pg_verifybackup", "recovery"} <= set(document["checked"])
    wrong = run_cli("verify", "--snapshot", "--json", env=cli_env(
        settings, BACKUP_DECRYPT_IDENTITY_FILE=str(scenario.wrong_identity)), timeout=600)
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["error_type"] == "IdentityUnusable", wrong.stdout
