"""Prune applies the retention plan to real files: data and manifest together, nothing else."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.prune import prune
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.dump import run_dump
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import worker_env


def age_copies(settings: Settings, days: list[int]) -> list[str]:
    """Make copies of the newest real dump that look ``days`` old (file and manifest)."""
    storage = open_storage(settings.backup_dir)
    real = catalog.newest(storage)
    root = Path(settings.backup_dir)
    ids = []
    for day in days:
        copy = catalog.Manifest.from_dict(real.to_dict())
        started = parse_time(real.started_at) - timedelta(days=day, minutes=5)
        copy.id = f"{real.database}-dump-{started.strftime('%Y%m%dT%H%M%SZ')}"
        copy.started_at = copy.finished_at = isoformat(started)
        copy.path = f"{copy.id}.dump.zst"
        shutil.copy(root / real.path, root / copy.path)
        catalog.save_new(storage, copy)
        ids.append(copy.id)
    return ids


def test_prune_deletes_old_dumps_with_their_manifests_and_nothing_foreign(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    run_dump(settings)
    old = age_copies(settings, [1, 3, 8, 20])
    root = Path(settings.backup_dir)
    foreign = [root / "aitrapp_backup_20261101_020000.sql.gz", root / "notes.txt"]
    for path in foreign:
        path.write_text("not ours")
    preview = prune(settings, dry_run=True)
    assert sorted(preview.deleted) == sorted(old[2:]) and (root / f"{old[3]}.dump.zst").exists()
    report = prune(settings)
    assert sorted(report.deleted) == sorted(old[2:]) and report.freed_bytes > 0
    for backup_id in old[2:]:
        assert not (root / f"{backup_id}.dump.zst").exists() and not (root / f"{backup_id}.manifest.json").exists()
    for backup_id in old[:2]:
        assert (root / f"{backup_id}.dump.zst").exists()
    assert all(path.exists() for path in foreign)
    assert prune(settings).deleted == []


@pytest.mark.slow
def test_prune_cli_json_lists_each_decision(trading_db: ConnInfo, tmp_path: Path) -> None:
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=str(tmp_path), BACKUP_LOCK_URL="",
                     BACKUP_KEEP_DAILY_DAYS="2")
    subprocess.run([BACKUP_TASKS, "dump"], env=env, check=True, capture_output=True)
    old = age_copies(Settings.from_env(env), [1, 5])
    dry = subprocess.run([BACKUP_TASKS, "prune", "--dry-run", "--json"], env=env, capture_output=True, text=True,
                         check=True)
    document = json.loads(dry.stdout)
    assert document["dry_run"] is True and document["deleted"] == [old[1]]
    assert {d["backup_id"]: d["keep"] for d in document["decisions"]}[old[0]] is True
    assert (tmp_path / f"{old[1]}.dump.zst").exists()
    human = subprocess.run([BACKUP_TASKS, "prune"], env=env, capture_output=True, text=True, check=True)
    assert f"delete {old[1]}" in human.stdout and not (tmp_path / f"{old[1]}.dump.zst").exists()
