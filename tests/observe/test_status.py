"""``status``: the recovery window and its age, the newest backups and their verdicts, WAL, copy, drill, next runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from backup_tasks.observe.facts import collect
from backup_tasks.observe.schedule import next_runs
from backup_tasks.observe.status import ago, document, render_text
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from tests.support.pitr import cli_env, run_cli

if TYPE_CHECKING:
    from tests.support.observe import Scene

KEYS = {"ok", "generated_at", "timezone", "backup_dir", "recovery_window", "newest_dump", "newest_snapshot", "wal",
        "copy", "last_drill", "next_runs", "sources", "problems", "generations", "generation_problem"}


def status_of(scene: Scene) -> tuple[dict[str, Any], str]:
    facts = collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    doc = document(facts, scene.settings)
    return doc, render_text(doc, scene.settings)


def test_the_text_says_since_when_and_until_how_recently(scene: Scene) -> None:
    _doc, text = status_of(scene)
    lines = text.splitlines()
    assert len(lines) <= 7, "a few lines, read in five seconds"
    # NOW is Mon 30 Nov 14:00 IST; the first snapshot is consistent from 15 h 40 s before, the WAL ends 40 s before.
    assert lines[0] == "restorable to any moment from Sun 29 Nov 22:59 IST to Mon 30 Nov 13:59:20 IST (40 s ago)"
    by_label = {line[:16].strip(): line[17:] for line in lines[1:]}
    assert by_label["newest dump"].startswith("Mon 30 Nov 08:01 IST (6.0 h ago), 3.3 MiB in 2 min, NOT VERIFIED")
    assert "verified ok" in by_label["newest snapshot"]
    assert by_label["WAL archive"] == f"newest {scene.segment(scene.last)} completed 40 s ago; no gaps"
    assert by_label["last drill"].startswith("ok, RTO 4.2 s, ")
    assert by_label["next runs"] == ("daily backup Tue 01 Dec 02:00 IST, health check Tue 01 Dec 09:00 IST, "
                                     "weekly snapshot Sun 06 Dec 03:00 IST")
    assert "copy" not in by_label, "no BACKUP_COPY_TO: no copy line"


def test_the_document_has_the_contracted_keys_and_values(scene: Scene) -> None:
    doc, _text = status_of(scene)
    assert set(doc) == KEYS
    assert doc["ok"] is True and doc["problems"] == []
    window = doc["recovery_window"]
    assert window["end_age_seconds"] == 40.0
    assert window["snapshot_id"] == scene.snapshots[0].id
    newest = doc["newest_dump"]
    assert newest["id"] == scene.dumps[-1].id and newest["verification"] is None
    wal = doc["wal"]
    assert wal["archive"]["segment"] == scene.segment(scene.last) and wal["archive"]["lag_seconds"] == 40.0
    assert wal["copy"] is None and wal["gaps"] == [] and wal["archiver"] is None
    assert [r["name"] for r in doc["next_runs"]] == ["daily-backup", "backup-health", "weekly-snapshot"]
    assert doc["next_runs"][0]["at"] == "2026-12-01T02:00:00+05:30"
    json.dumps(doc)


def test_a_wal_gap_is_named(scene: Scene) -> None:
    scene.without_segment(0x14)
    doc, text = status_of(scene)
    assert f"GAP at {scene.segment(0x14)}" in text
    assert doc["wal"]["gaps"][0]["segment"] == scene.segment(0x14)


@pytest.mark.slow
def test_the_command_shows_what_the_copy_lacks(disk_scene: Callable[..., Scene], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    scene = disk_scene(copy_to=str(copy))
    held = LocalStorage(copy)
    for m in [*scene.dumps, *scene.snapshots][1:]:  # the oldest dump never reached the copy
        held.put_bytes(m.path, b"data")
        held.put_bytes(m.key, m.to_json().encode())
    result = run_cli("status", "--json", env=cli_env(scene.settings, BACKUP_COPY_TO=str(copy)))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["copy"]["backups_missing"] == [scene.dumps[0].id]
    assert doc["copy"]["reachable"] is True
    text = run_cli("status", env=cli_env(scene.settings, BACKUP_COPY_TO=str(copy))).stdout
    assert f"1 backup(s) MISSING: {scene.dumps[0].id}" in text


def test_an_unreadable_catalog_exits_1_naming_it(disk_scene: Callable[..., Scene], tmp_path: Path) -> None:
    scene = disk_scene()
    Path(scene.settings.backup_dir).rename(tmp_path / "gone")
    result = run_cli("status", env=cli_env(scene.settings))
    assert result.returncode == 1
    assert result.stdout.startswith("PROBLEM catalog: BACKUP_DIR ")


def test_ages_read_at_a_glance() -> None:
    assert [ago(s) for s in (40, 600, 5 * 3600, 3 * 86400)] == ["40 s", "10 min", "5.0 h", "3.0 d"]


def test_next_runs_follow_the_exchange_timezone_not_the_servers() -> None:
    settings = Settings(timezone="America/New_York", broker_url="memory://")
    now = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT, the night the clocks go back
    [(first, at), *_rest] = next_runs(settings, now)
    assert first.name == "daily-backup"
    assert at.isoformat() == "2026-11-01T02:00:00-05:00", "02:00 local, after the switch to EST"
