"""One reading of the state: the recovery window, WAL gaps, the latest verification and drill, failed sources."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backup_tasks.observe.facts import CATALOG, SERVER, WAL_ARCHIVE, WAL_STATE, collect
from backup_tasks.postgres.archiver import SERVER_TIMEOUT
from backup_tasks.postgres.connect import connect

if TYPE_CHECKING:
    from tests.support.observe import Scene


def test_window_runs_from_the_oldest_snapshot_to_the_end_of_unbroken_wal(scene: Scene) -> None:
    facts = collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    assert facts.up and facts.problems() == []
    [window] = facts.windows
    assert window.start == scene.completed_at(scene.first + 1)
    assert window.end == scene.now - timedelta(seconds=scene.end_age)
    assert window.snapshot_id == scene.snapshots[0].id
    assert facts.gaps == []


def test_a_wal_gap_moves_the_window_start_to_the_first_snapshot_after_it(scene: Scene) -> None:
    scene.without_segment(0x14)
    facts = collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    [window] = facts.windows
    assert window.start == scene.completed_at(0x19), "nothing between the gap and the next snapshot is reachable"
    assert window.snapshot_id == scene.snapshots[1].id
    assert window.end == scene.now - timedelta(seconds=scene.end_age)
    [gap] = facts.gaps
    assert gap.segment == scene.segment(0x14)
    assert gap.after == scene.completed_at(0x13)


def test_series_take_the_newest_backup_and_the_latest_verification(scene: Scene) -> None:
    facts = collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    dumps = next(s for s in facts.series if s.kind == "dump")
    assert dumps.count == 3
    assert dumps.newest.id == scene.dumps[-1].id, "the newest, though not verified yet"
    assert dumps.last_verified_id == scene.dumps[1].id
    assert dumps.last_verification is not None and dumps.last_verification.ok is False
    [drill] = facts.drills
    assert (drill.snapshot_id, drill.ok, drill.duration_seconds) == (scene.snapshots[1].id, True, 4.2)


def test_a_missing_backup_dir_is_a_failed_catalog_not_an_empty_one(scene: Scene, tmp_path: Path) -> None:
    settings = replace(scene.settings, backup_dir=str(tmp_path / "not-mounted"))
    facts = collect(settings, archive=scene.archive, now=scene.now)
    assert not facts.up
    assert facts.read_ok(CATALOG) is False
    assert "does not exist" in (facts.source(CATALOG).error or "")  # type: ignore[union-attr]
    assert facts.series == [] and facts.windows == []
    assert facts.wal, "the state file is another source: still read"


def test_snapshots_without_their_archive_make_the_reading_fail(scene: Scene, tmp_path: Path) -> None:
    scene.archive.root.rename(tmp_path / "moved")
    facts = collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    assert not facts.up
    assert facts.read_ok(WAL_ARCHIVE) is False
    assert facts.windows == [], "no window is guessed without the archive"
    assert facts.series, "the catalog's facts stand"


def test_a_damaged_state_file_fails_its_source_only(scene: Scene) -> None:
    (scene.archive.root / ".state.json").write_text("{")
    facts = collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    assert not facts.up
    assert facts.read_ok(WAL_STATE) is False
    assert facts.wal == {}
    assert facts.windows, "the coverage comes from the archive itself"


@pytest.mark.slow
def test_a_server_that_never_answers_costs_seconds_and_keeps_up(scene: Scene) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        settings = replace(scene.settings, database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres")
        started = time.monotonic()
        facts = collect(settings, storage=scene.storage, archive=scene.archive, now=scene.now)
        elapsed = time.monotonic() - started
    assert elapsed < SERVER_TIMEOUT + 3, f"a scrape waited {elapsed:.1f}s on a silent server"
    assert facts.read_ok(SERVER) is False
    assert "127.0.0.1" in (facts.source(SERVER).error or "")  # type: ignore[union-attr]
    assert facts.up, "the backups' own sources were read: a down database does not hide them"
    assert facts.archiver is None
    assert facts.series and facts.windows


def test_the_server_answers_with_its_archiver_row(scene: Scene, pg_admin: object) -> None:
    from tests.support.postgres import url_of

    settings = replace(scene.settings, database_url=url_of(pg_admin))  # type: ignore[arg-type]
    facts = collect(settings, storage=scene.storage, archive=scene.archive, now=scene.now)
    assert facts.read_ok(SERVER), facts.problems()
    with connect(pg_admin) as conn:  # type: ignore[arg-type]
        row = conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone()
        current = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    assert facts.archiver is not None and (facts.archiver.archived_count, facts.archiver.failed_count) == row
    # The same reading tells health which segment the server writes and on which timeline.
    assert facts.server is not None and facts.server.current_segment is not None
    assert facts.server.current_segment <= current and facts.server.timeline == int(current[:8], 16)
