"""Point-in-time recovery against real servers: a source archiving through ``wal-push``, restores into
fresh data directories started as the ``postgres`` user, exactly the rows of the chosen moment."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.physical.drill import pitr_drill
from backup_tasks.physical.plan import parse_target_time, snapshot_ranges
from backup_tasks.postgres.cluster import SERVER_USER, as_server_user, server_uid_gid
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import DIR_MODE, FILE_MODE
from backup_tasks.wal.names import position
from backup_tasks.wal.restore_points import restore_point_for_day, restore_points
from tests.support.pitr import Scenario, cli_env, marks, run_cli

pytestmark = pytest.mark.slow


def restore(scenario: Scenario, dirs: list[Path], *args: str, settings: Settings | None = None,
            start: bool = True) -> tuple[subprocess.CompletedProcess[str], dict]:
    data_dir = scenario.env.base / f"restored-{len(dirs)}-{random.randrange(1 << 30)}"
    dirs.append(data_dir)
    command = ["restore-pitr", "--json", "--data-dir", str(data_dir), *args, *(["--start"] if start else [])]
    result = run_cli(*command, env=cli_env(settings or scenario.settings))
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


def test_restore_to_a_noted_time_brings_back_exactly_the_rows_committed_before_it(
        scenario: Scenario, restored_dirs: list[Path]) -> None:
    result, report = restore(scenario, restored_dirs, "--target-time", scenario.noted_time)
    assert result.returncode == 0, result.stderr + result.stdout
    assert report["ok"] and report["started"] and report["outcome"]["finished"]
    assert report["snapshot_id"] == scenario.snapshot.id
    assert marks(report["port"]) == list(range(1, 101))
    assert "recovery stopping before commit" in report["outcome"]["stop_reason"]
    assert report["recovery_settings"]["archive_mode"] == "off", "a restored copy never archives by default"
    with psycopg.connect(host="127.0.0.1", port=report["port"], user=SERVER_USER, dbname="postgres") as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False, "promoted: it opens for writes"
        assert conn.execute("SHOW archive_mode").fetchone()[0] == "off"


def test_restore_to_latest_and_to_a_named_restore_point(scenario: Scenario, restored_dirs: list[Path]) -> None:
    result, report = restore(scenario, restored_dirs)
    assert result.returncode == 0, result.stderr + result.stdout
    assert marks(report["port"]) == list(range(1, 171))
    result, report = restore(scenario, restored_dirs, "--target-name", scenario.point_name)
    assert result.returncode == 0, result.stderr + result.stdout
    assert marks(report["port"]) == list(range(1, 151))
    assert "restore point" in report["outcome"]["stop_reason"]


def test_restore_without_start_leaves_a_ready_data_directory(scenario: Scenario, restored_dirs: list[Path]) -> None:
    when = datetime.fromisoformat(scenario.noted_time).astimezone(UTC) + timedelta(hours=5, minutes=30)
    ist = when.strftime("%Y-%m-%d %H:%M:%S.%f") + "+05:30"  # the same moment, written in exchange time
    result, report = restore(scenario, restored_dirs, "--target-time", ist, start=False)
    assert result.returncode == 0, result.stderr
    data_dir = Path(report["data_dir"])
    assert (data_dir / "recovery.signal").exists() and (data_dir / "backup_label").exists()
    auto = (data_dir / "postgresql.auto.conf").read_text()
    assert "wal-fetch --archive-dir" in auto and "recovery_target_time" in auto and "archive_mode = 'off'" in auto
    assert "recovery_target_action = 'promote'" in auto
    ids = server_uid_gid()
    if ids is not None:
        assert data_dir.stat().st_uid == ids[0], "handed to the server's OS user"
    # whoever starts it gets the server at the target
    cluster_log = data_dir / "manual.log"
    port = str(40000 + random.randrange(20000))
    subprocess.run([*as_server_user(), "/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(data_dir), "-l",
                    str(cluster_log), "-w", "-t", "120", "-o", f"-p {port} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, cwd="/")
    deadline = datetime.now() + timedelta(seconds=60)
    while True:
        try:
            with psycopg.connect(host="127.0.0.1", port=int(port), user=SERVER_USER, dbname="postgres") as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    break
        except psycopg.OperationalError:
            pass
        assert datetime.now() < deadline, cluster_log.read_text()[-2000:]
        time.sleep(0.3)
    assert marks(int(port)) == list(range(1, 101))


def test_refuses_targets_outside_the_archive_and_non_empty_directories(scenario: Scenario, tmp_path: Path) -> None:
    env = cli_env(scenario.settings)
    for when in ("2000-01-01 00:00:00+00", "2099-01-01 00:00:00+00"):
        result = run_cli("restore-pitr", "--target-time", when, "--data-dir", str(tmp_path / "new"), env=env)
        assert result.returncode == 1
        assert "cover" in result.stderr and scenario.snapshot.id in result.stderr, result.stderr
        assert not (tmp_path / "new").exists(), "nothing was written"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    result = run_cli("restore-pitr", "--data-dir", str(occupied), env=env)
    assert result.returncode == 1 and "not empty" in result.stderr
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    bad = run_cli("restore-pitr", "--target-time", "yesterday-ish", "--data-dir", str(tmp_path / "x"), env=env)
    assert bad.returncode == 2 and "timestamp" in bad.stderr


def copy_archive(source: WalArchive, destination: Path) -> WalArchive:
    """A copy with the archive's ownership and modes, so the postgres user can read it as it reads the real one."""
    shutil.copytree(source.root, destination, ignore=shutil.ignore_patterns(".backup-tasks-tool"))
    ids = server_uid_gid()
    for path in [destination, *destination.rglob("*")]:
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)
        if ids is not None:
            os.chown(path, *ids)
    return WalArchive.in_directory(destination)


def segments_after_snapshot(scenario: Scenario, archive: WalArchive) -> list[str]:
    start = str(scenario.snapshot.stop_segment)
    return [n for n in archive.segment_names() if position(n) > position(start)]


def test_missing_segment_fails_with_a_clear_message_instead_of_stopping_early(
        scenario: Scenario, restored_dirs: list[Path]) -> None:
    archive = copy_archive(scenario.env.archive, scenario.env.base / "wal-with-gap")
    needed = segments_after_snapshot(scenario, archive)
    assert len(needed) >= 2
    archive.delete(needed[0])
    settings = replace(scenario.settings, wal_archive_dir=str(archive.root))
    result, _ = restore(scenario, restored_dirs, settings=settings)
    assert result.returncode == 1
    assert needed[0] in result.stderr and "missing" in result.stderr, result.stderr
    # wal-fetch, asked for it directly (as restore_command would be), refuses fatally too
    fetch = run_cli("wal-fetch", "--archive-dir", str(archive.root), needed[0], str(scenario.env.base / "x"),
                    env=cli_env(settings))
    assert fetch.returncode == 200


def test_corrupt_segment_stops_recovery_loudly(scenario: Scenario, restored_dirs: list[Path]) -> None:
    archive = copy_archive(scenario.env.archive, scenario.env.base / "wal-corrupt")
    victim = archive.path_for(segments_after_snapshot(scenario, archive)[0])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    settings = replace(scenario.settings, wal_archive_dir=str(archive.root))
    result, report = restore(scenario, restored_dirs, settings=settings)
    assert result.returncode == 1
    assert report["ok"] is False
    assert any("damaged" in note for note in report["notes"]), report["notes"]


def test_pitr_drill_opens_at_the_chosen_moment(scenario: Scenario) -> None:
    target = datetime.fromisoformat(scenario.noted_time)
    result = pitr_drill(scenario.settings, target=target)
    assert result.ok, result.problems
    assert result.snapshot_id == scenario.snapshot.id
    assert result.reached["last_transaction_at"] is not None
    assert datetime.fromisoformat(result.reached["last_transaction_at"]) <= target
    recorded = catalog.load(open_storage(scenario.settings.backup_dir), scenario.snapshot.id)
    assert recorded.pitr_drill is not None and recorded.pitr_drill["ok"] is True
    ranges = snapshot_ranges(open_storage(scenario.settings.backup_dir), scenario.env.archive)
    assert ranges[-1].restorable_from <= target <= ranges[-1].restorable_until
    random_drill = pitr_drill(scenario.settings, seed=7)
    assert random_drill.ok, random_drill.problems


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-27 15:55:47.625773+00", "2026-11-27T15:55:47.625773+00:00"),
    ("2026-11-23 15:29:59+05:30", "2026-11-23T09:59:59+00:00"),
    ("2026-11-23T15:29:59Z", "2026-11-23T15:29:59+00:00"),
    ("2026-11-23 15:29:59 UTC", "2026-11-23T15:29:59+00:00"),
    ("2026-11-23 15:29:59", "2026-11-23T09:59:59+00:00"),  # no zone: BACKUP_TIMEZONE (Asia/Kolkata)
])
def test_target_times_in_the_forms_postgresql_prints(text: str, expected: str) -> None:
    assert parse_target_time(text, Settings()).isoformat() == expected


def test_post_close_restore_point_when_pitr_is_configured(scenario: Scenario) -> None:
    point = restore_point_for_day(scenario.settings, "2026-11-30")
    assert point is not None and point.name == "trading-day-2026-11-30-close" and point.trading_day == "2026-11-30"
    assert point.name in [p.name for p in restore_points(scenario.env.archive)]


def test_restore_point_from_the_cli(scenario: Scenario) -> None:
    result = run_cli("restore-point", "--json", "cli-made-point", env=cli_env(scenario.settings))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["name"] == "cli-made-point" and document["lsn"]
    assert (scenario.env.archive.root / "restore_points").is_dir()
