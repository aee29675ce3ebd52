"""`restore`: the seed's manual "Full Restore", done safely."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, ConfigError, RestoreFailed, RestoreRefused
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.restore import restore_backup
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from tests.support.data import rewrite_archive
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import worker_env

#: A fingerprint of everything awkward in the tricky database, compared between source and copy.
FINGERPRINT_SQL = """
SELECT json_build_object(
  'mixed', (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM "Trading Desk"."MixedCase Table" t),
  'measurements', (SELECT md5(string_agg(m::text, ',' ORDER BY id)) FROM measurements m),
  'blob', (SELECT md5(string_agg(encode(blob, 'hex'), '' ORDER BY id)) FROM measurements),
  'sequence', (SELECT last_value FROM ticket_seq),
  'matview', (SELECT sum(n) FROM measurement_totals),
  'view', (SELECT count(*) FROM happy_rows),
  'enum', (SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum
           WHERE enumtypid = '"Mood"'::regtype),
  'unlogged', (SELECT relpersistence FROM pg_class WHERE relname = 'scratch_cache'),
  'partitions', (SELECT count(*) FROM pg_inherits WHERE inhparent = 'measurements'::regclass))::text
"""


def fingerprint(conninfo: ConnInfo) -> dict[str, object]:
    with connect(conninfo) as conn:
        return dict(json.loads(conn.execute(FINGERPRINT_SQL).fetchone()[0]))


@pytest.mark.slow
def test_restore_reproduces_every_object_exactly(
        tricky_db: ConnInfo, settings_for: Callable[..., Settings], make_database: Callable[..., ConnInfo]) -> None:
    settings = settings_for(tricky_db)
    manifest, _ = run_dump(settings)
    target = make_database()  # exists and is empty: restored into as is
    result = restore_backup(settings, manifest.id, url_of(target))
    assert result.ok and not result.replaced and result.tables == len(manifest.tables)
    assert fingerprint(target) == fingerprint(tricky_db)
    assert fingerprint(target)["sequence"] == 4242 and fingerprint(target)["unlogged"] == "u"


@pytest.mark.slow
def test_restore_creates_a_missing_database_and_refuses_a_non_empty_one(
        trading_db: ConnInfo, settings_for: Callable[..., Settings], make_database: Callable[..., ConnInfo]) -> None:
    settings = settings_for(trading_db)
    manifest, _ = run_dump(settings)
    holder = make_database()  # only to get a name we will clean up: drop it, restore re-creates it
    with connect(holder.with_dbname("postgres")) as admin:
        admin.execute(f'DROP DATABASE "{holder.dbname}"')
    assert restore_backup(settings, manifest.id, url_of(holder)).rows == sum(manifest.tables.values())
    with pytest.raises(RestoreRefused, match="not empty"):
        restore_backup(settings, manifest.id, url_of(holder))
    with connect(holder) as conn:
        conn.execute("INSERT INTO signals (ts, symbol, side) VALUES (now(), 'EXTRA', 'BUY')")
    replaced = restore_backup(settings, manifest.id, url_of(holder), replace=True)
    assert replaced.replaced and replaced.ok
    with connect(holder) as conn:
        assert conn.execute("SELECT count(*) FROM signals WHERE symbol = 'EXTRA'").fetchone()[0] == 0


def test_restore_refuses_the_source_database_and_a_corrupt_backup(
        trading_db: ConnInfo, settings_for: Callable[..., Settings], make_database: Callable[..., ConnInfo]) -> None:
    settings = settings_for(trading_db)
    manifest, _ = run_dump(settings)
    with pytest.raises(RestoreRefused, match="database being backed up"):
        restore_backup(settings, manifest.id, url_of(trading_db))
    path = Path(settings.backup_dir) / manifest.path
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    target = make_database()
    with pytest.raises(BackupCorrupt):
        restore_backup(settings, manifest.id, url_of(target))
    with connect(target) as conn:  # refused before a single row was written
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
    with pytest.raises(ConfigError, match="RESTORE_DATABASE_URL"):
        restore_backup(settings, manifest.id, None)


@pytest.mark.slow
def test_cli_restore_takes_the_target_from_the_environment(
        trading_db: ConnInfo, make_database: Callable[..., ConnInfo], tmp_path: Path) -> None:
    target = make_database()
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=str(tmp_path), BACKUP_LOCK_URL="",
                     RESTORE_DATABASE_URL=url_of(target, scheme="postgresql+psycopg2"))
    dumped = json.loads(subprocess.run([BACKUP_TASKS, "dump", "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    restored = subprocess.run([BACKUP_TASKS, "restore", dumped["id"], "--json"], env=env, capture_output=True,
                              text=True, check=False)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["rows"] == sum(dumped["tables"].values())
    again = subprocess.run([BACKUP_TASKS, "restore", dumped["id"], "--target-database-url", url_of(target)],
                           env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_a_failed_replace_leaves_the_target_as_it_was(
        trading_db: ConnInfo, settings_for: Callable[..., Settings], make_database: Callable[..., ConnInfo],
        pg_admin: ConnInfo) -> None:
    settings = settings_for(trading_db)
    manifest, _ = run_dump(settings)
    rewrite_archive(Path(settings.backup_dir) / manifest.path, manifest, settings, lambda raw: raw[: len(raw) // 2])
    target = make_database()
    with connect(target) as conn:
        conn.execute("CREATE TABLE precious (note text); INSERT INTO precious VALUES ('still here')")
    with pytest.raises((BackupCorrupt, RestoreFailed)):
        restore_backup(settings, manifest.id, url_of(target), replace=True)
    with connect(target) as conn:
        assert conn.execute("SELECT note FROM precious").fetchone()[0] == "still here"
    with connect(pg_admin) as conn:  # and the staging copy is gone
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                            (f"{target.dbname}__restoring_%",)).fetchone()[0] == 0
