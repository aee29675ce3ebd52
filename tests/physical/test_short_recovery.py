"""Never a wrong or a short recovery: a snapshot that failed its verification is passed over (and
named), ``--snapshot ID`` chooses one, and a recovery that ends before the target fails loudly.

Rows are checked against the source's commit timestamps (``track_commit_timestamp``).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.conninfo import ConnInfo
from backup_tasks.physical import drill as drill_module
from backup_tasks.physical import restore as restore_module
from backup_tasks.physical.drill import pitr_drill
from backup_tasks.physical.plan import RestorePlan, latest_target
from backup_tasks.physical.restore import restore_pitr
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal import state
from tests.support.pitr import PitrEnv, cli_env, insert, marks, reachable_dir, run_cli, stop_restored, wait_archived

pytestmark = pytest.mark.slow


@dataclass
class Series:
    env: PitrEnv
    settings: Settings
    source: ConnInfo
    older: catalog.Manifest  # unverified, sound
    newest: catalog.Manifest  # sound until ``fail_newest``: then damaged, and recorded FAILED by verify
    between: str  # after the newest snapshot: both cover it
    end: str  # after the last commit: recovery to it is recovery to the end of the archive
    restored: list[Path]


def now(conninfo: ConnInfo) -> str:
    time.sleep(0.05)  # commits before and after the noted moment never share a microsecond
    with connect(conninfo) as conn:
        moment = str(conn.execute("SELECT clock_timestamp()::text").fetchone()[0])
    time.sleep(0.05)
    return moment


def committed_by(conninfo: ConnInfo, moment: str) -> list[int]:
    with connect(conninfo) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM marks WHERE pg_xact_commit_timestamp(xmin) <= "
                                           "%s::timestamptz ORDER BY id", (moment,))]


@pytest.fixture(scope="module")
def series() -> Iterator[Series]:
    """Snapshot; rows 1-100; snapshot; rows 101-150; a noted time; rows 151-170; a noted time; the segment
    switched and archived."""
    env = PitrEnv(reachable_dir("bt-test-short-"))
    restored: list[Path] = []
    try:
        with ThrowawayCluster(settings={**env.archiving_cluster().settings, "track_commit_timestamp": "on"}) as src:
            source, settings = src.conninfo(), env.for_cluster(src)
            with connect(source) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
            older = take_snapshot(settings)
            insert(source, 1, 100, "first")
            newest = take_snapshot(settings)
            insert(source, 101, 150, "second")
            between = now(source)
            insert(source, 151, 170, "third")
            end = now(source)
            with connect(source) as conn:  # no commit after ``end``: pg_switch_wal alone
                name = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
            wait_archived(env.archive, name)
            yield Series(env, settings, source, older, newest, between, end, restored)
    finally:
        stop_restored(restored)
        shutil.rmtree(env.base, ignore_errors=True)


def data_dir(series: Series) -> Path:
    path = series.env.base / f"restored-{len(series.restored)}-{random.randrange(1 << 30)}"
    series.restored.append(path)
    return path


def restore(series: Series, *args: str, start: bool = False) -> tuple[int, dict[str, Any], str]:
    result = run_cli("restore-pitr", "--json", "--data-dir", str(data_dir(series)), *args,
                     *(["--start"] if start else []), env=cli_env(series.settings))
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}, result.stderr


def test_a_segment_lost_after_planning_fails_the_restore_and_the_drill_loudly(
        series: Series, monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest segment goes missing between planning and recovery, and nothing left in the archive says
    it ever existed (its state file is gone too, as in an archive directory restored from elsewhere): wal-fetch
    answers "not archived", PostgreSQL ends recovery early and promotes. That must be a failure saying what
    is missing, not a copy silently short of the target."""
    hidden: list[tuple[Path, Path]] = []

    def aside(path: Path) -> None:
        if path.exists():
            moved = path.with_name(path.name + ".aside")
            path.rename(moved)
            hidden.append((moved, path))

    def planned_then_lost(real: Any) -> Any:
        def plan(*args: Any, **kwargs: Any) -> RestorePlan:
            found: RestorePlan = real(*args, **kwargs)
            end = found.range.coverage.end_segment
            assert end is not None
            aside(series.env.archive.path_for(end))
            aside(state.state_path(series.env.archive.root))
            return found
        return plan

    try:
        monkeypatch.setattr(restore_module, "plan_restore", planned_then_lost(restore_module.plan_restore))
        report = restore_pitr(series.settings, latest_target(), data_dir(series), start=True, timeout=300)
        assert report.ok is False, report.notes
        lost = hidden[0][1].name.removesuffix(".zst")
        assert any("SHORT" in note and lost in note for note in report.notes), report.notes
        assert not (Path(report.data_dir) / "postmaster.pid").exists(), "the short copy is not left running"
        for moved, path in hidden:
            moved.rename(path)
        hidden.clear()

        monkeypatch.setattr(drill_module, "plan_restore", planned_then_lost(drill_module.plan_restore))
        drilled = pitr_drill(series.settings, target=datetime.fromisoformat(series.end))
        assert drilled.ok is False
        assert any("SHORT" in problem for problem in drilled.problems), drilled.problems
    finally:
        for moved, path in hidden:
            moved.rename(path)


def fail_newest(series: Series) -> None:
    """Damage the newest snapshot (one flipped byte: the catalog's sha256 no longer matches); verify records it."""
    if series.newest.verification is not None:
        return
    path = series.env.backup_dir / series.newest.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    verified = run_cli("verify", "--json", series.newest.id, env=cli_env(series.settings))
    assert verified.returncode == 1, verified.stdout + verified.stderr
    series.newest = catalog.load(open_storage(series.settings.backup_dir), series.newest.id)
    assert series.newest.verification is not None and not series.newest.verification.ok


def test_a_snapshot_that_failed_verification_is_skipped_and_named_and_can_be_chosen(series: Series) -> None:
    fail_newest(series)
    older, newest = series.older.id, series.newest.id
    code, report, stderr = restore(series, "--target-time", series.between, start=True)
    assert code == 0, stderr + json.dumps(report.get("notes"))
    assert report["snapshot_id"] == older
    assert [s["backup_id"] for s in report["skipped_snapshots"]] == [newest]
    assert "failed" in report["skipped_snapshots"][0]["reason"]
    assert any(newest in note and "--snapshot" in note for note in report["notes"]), report["notes"]
    assert marks(report["port"]) == committed_by(series.source, series.between) == list(range(1, 151))

    # --snapshot ID: the sound one, explicitly.
    code, report, stderr = restore(series, "--snapshot", older)
    assert code == 0 and report["snapshot_id"] == older and report["skipped_snapshots"] == [], stderr
    # The failed one only when asked, with a warning (and here it is damaged indeed: the unpack refuses it).
    code, report, stderr = restore(series, "--snapshot", newest)
    assert code == 1, stderr
    assert "warning" in stderr.lower() and newest in stderr and "verification" in stderr, stderr
    # An unknown id is a usage error; a snapshot that does not cover the target says what is covered.
    code, _, stderr = restore(series, "--snapshot", "no-such-snapshot")
    assert code == 2 and "no-such-snapshot" in stderr, stderr
    before = datetime.fromisoformat(str(series.newest.restorable_from)).replace(microsecond=0).isoformat()
    code, _, stderr = restore(series, "--snapshot", newest, "--target-time", before)
    assert code == 1 and "cover" in stderr, stderr
