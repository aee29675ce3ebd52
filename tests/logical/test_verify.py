"""Verification restores somewhere that is not production, compares, and records the verdict."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.verify import verify_backup
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.data import rewrite_archive
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import worker_env

pytestmark = pytest.mark.slow  # each test starts a throwaway cluster (about a second)


def dumped(settings: Settings) -> tuple[Manifest, Path]:
    manifest, _ = run_dump(settings)
    return manifest, Path(settings.backup_dir) / manifest.path


def reload(settings: Settings, backup_id: str) -> Manifest:
    return catalog.load(open_storage(settings.backup_dir), backup_id)


def test_a_good_backup_verifies_in_a_throwaway_cluster_and_the_verdict_is_recorded(
        tricky_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(tricky_db)
    manifest, _ = dumped(settings)
    result = verify_backup(settings)  # no id: the newest
    assert result.ok, result.problems
    assert result.method == "throwaway-cluster"
    assert result.checked == ["sha256", "roles", "restore", "owners", "privileges", "row-counts", "amcheck",
                              "database-properties"]
    assert result.tables_compared == len(manifest.tables) and result.indexes_checked >= 3
    recorded = reload(settings, manifest.id).verification
    assert recorded is not None and recorded.ok and recorded.verified_at and recorded.duration_seconds > 0


def test_a_flipped_byte_fails_verification_saying_so(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    manifest, path = dumped(settings)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_backup(settings, manifest.id)
    assert not result.ok and "fails its checksum" in result.problems[0] and "damaged" in result.problems[0]
    assert result.checked == []
    assert reload(settings, manifest.id).verification == result


def test_a_truncated_file_fails_verification(trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    manifest, path = dumped(settings)
    path.write_bytes(path.read_bytes()[: manifest.size_bytes // 3])
    result = verify_backup(settings, manifest.id)
    assert not result.ok and "truncated" in result.problems[0]


def test_a_damaged_archive_with_a_valid_checksum_fails_the_restore(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    manifest, path = dumped(settings)
    rewrite_archive(path, manifest, settings, lambda raw: raw[: len(raw) * 2 // 3])
    result = verify_backup(settings, manifest.id)
    assert not result.ok and result.checked == ["sha256", "roles"]  # the roles went in; the restore failed
    assert "pg_restore" in result.problems[0] or "not a readable" in result.problems[0]


def test_row_count_differences_and_missing_tables_are_named(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    manifest, _ = dumped(settings)
    manifest.tables["public.orders"] += 1
    manifest.tables["public.ghost_table"] = 5
    open_storage(settings.backup_dir).put_bytes(manifest.key, manifest.to_json().encode())  # tampered in place
    result = verify_backup(settings, manifest.id)
    assert not result.ok
    assert any("public.orders" in p and "rows restored" in p for p in result.problems)
    assert any("public.ghost_table is missing" in p for p in result.problems)


def test_verify_database_url_uses_a_scratch_database_and_drops_it(
        trading_db: ConnInfo, settings_for: Callable[..., Settings], pg_admin: ConnInfo) -> None:
    settings = settings_for(trading_db, verify_database_url=url_of(pg_admin))
    manifest, _ = dumped(settings)
    result = verify_backup(settings, manifest.id)
    assert result.ok and result.method == "scratch-database"
    with connect(pg_admin) as conn:
        leftovers = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'backup_tasks_verify_%'")
        assert leftovers.fetchall() == []


def test_cli_verify_json_and_exit_codes(trading_db: ConnInfo, tmp_path: Path) -> None:
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=str(tmp_path / "b"), BACKUP_LOCK_URL="")
    subprocess.run([BACKUP_TASKS, "dump"], env=env, check=True, capture_output=True)
    good = subprocess.run([BACKUP_TASKS, "verify", "--json"], env=env, capture_output=True, text=True, check=False)
    assert good.returncode == 0, good.stderr
    document = json.loads(good.stdout)
    assert document["ok"] is True and document["backup_id"].startswith(trading_db.dbname)
    path = next((tmp_path / "b").glob("*.dump.zst"))
    path.write_bytes(path.read_bytes()[:-10])
    bad = subprocess.run([BACKUP_TASKS, "verify", "--json"], env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
    unknown = subprocess.run([BACKUP_TASKS, "verify", "nope"], env=env, capture_output=True, text=True, check=False)
    assert unknown.returncode == 1 and "no backup 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_production_is_never_touched(trading_db: ConnInfo, settings_for: Callable[..., Settings],
                                     pg_admin: ConnInfo) -> None:
    settings = settings_for(trading_db)
    dumped(settings)

    def databases() -> set[str]:  # other test sessions may create their own bt_test_* meanwhile
        with connect(pg_admin) as conn:
            return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname NOT LIKE 'bt\\_%'")}

    before = databases()
    assert verify_backup(settings).ok
    assert databases() == before
    with psycopg.connect(**trading_db.kwargs()) as conn:  # amcheck ran in the copy, not here
        assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone() is None
