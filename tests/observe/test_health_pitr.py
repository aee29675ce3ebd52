"""Health of snapshots and WAL continuity: the pure decisions, then ``check_health`` on a real archive directory.

The catalog is a ``MemoryStorage``; the WAL archive a real directory of tiny files pushed with
``WalArchive.push`` (their trailers carry the completion time, so the clock decides "in flight").
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import utcnow
from backup_tasks.errors import HealthCheckFailed, StorageError
from backup_tasks.observe.continuity import Hole, WalSurvey
from backup_tasks.observe.health import IN_FLIGHT_GRACE, assess_snapshots, assess_wal, check_health, pitr_configured
from backup_tasks.postgres.archiver import SERVER_TIMEOUT, ArchiverStats, ServerWal
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import TimelineStep, coverages
from backup_tasks.wal.names import segment_name
from tests.support.data import NOW, dump

SIZE = 16 << 20
GRACE = timedelta(hours=5)


def seg(number: int, timeline: int = 1) -> str:
    return segment_name(timeline, number, SIZE)


def snapshot(days_ago: float, *, verified: bool | None = None, start: int = 2, window: bool = False) -> Manifest:
    """A snapshot starting at segment ``start``; ``window``: it records ``restorable_from`` (the recovery window's)."""
    taken = dump(days_ago, verified=verified, kind="snapshot")
    return replace(taken, start_segment=seg(start), stop_segment=seg(start), wal_segment_size=SIZE, timeline=1,
                   format="pg_basebackup-tar", restorable_from=taken.finished_at if window else None)


def judge(snapshots: list[Manifest]) -> list[str]:
    return assess_snapshots(snapshots, NOW, pitr=True, why="test", verify_grace=GRACE).problems


def survey(last: int, holes: list[Hole] | None = None, **values: object) -> WalSurvey:
    base = WalSurvey(archive="/wal", start_segment=seg(2), segment_size=SIZE, steps=[TimelineStep(1, 0)],
                     last_archived=seg(last), unbroken_to=seg(last), holes=holes or [], newest_timeline=1)
    return replace(base, **values)  # type: ignore[arg-type]


def ago(span: timedelta) -> float:
    return (NOW - span).timestamp()


def archiver(last_archived: str | None, *, failing: bool = False) -> ArchiverStats:
    """A ``pg_stat_archiver`` row that archived up to ``last_archived`` (and failed an hour ago when ``failing``)."""
    return ArchiverStats(archived_count=9, last_archived_wal=last_archived, last_archived_at=NOW - timedelta(hours=2),
                         failed_count=1 if failing else 0, last_failed_wal=seg(10) if failing else None,
                         last_failed_at=NOW - timedelta(hours=1) if failing else None, failing=failing)


# --- snapshots (pure) ----------------------------------------------------------------------------------

def test_a_recent_verified_snapshot_is_healthy() -> None:
    assert judge([snapshot(14, verified=False), snapshot(6.5, verified=True)]) == []


def test_a_stale_snapshot_is_named() -> None:
    stale = snapshot(8.5, verified=True)
    [problem] = judge([stale])
    assert stale.id in problem and "8.5 days old" in problem


@pytest.mark.parametrize(("verified", "days_ago", "expected"), [
    (None, 0.5, "has never been verified"),
    (False, 1, "failed verification"),
    (None, 0.1, None),  # 2.4 hours: its verify task may still be running
])
def test_an_unverified_or_failed_snapshot_is_named(verified: bool | None, days_ago: float,
                                                   expected: str | None) -> None:
    newest = snapshot(days_ago, verified=verified)
    found = judge([snapshot(7, verified=True), newest])  # an older verified one does not hide the newest
    assert found == ([] if expected is None else [found[0]])
    if expected:
        assert expected in found[0] and newest.id in found[0]


def test_a_snapshot_that_cannot_be_restored_is_named() -> None:
    broken = replace(snapshot(1, verified=True), start_segment=None)
    [problem] = judge([broken])
    assert "cannot be restored" in problem


def test_pitr_is_configured_by_a_snapshot_an_archive_setting_or_archived_wal() -> None:
    assert pitr_configured([], False, "/b/wal", False)[0] is False
    assert pitr_configured([snapshot(1)], False, "/b/wal", False)[0]
    assert pitr_configured([], True, "/wal", False)[0]
    assert pitr_configured([], False, "/b/wal", True)[0]
    unjudged = assess_snapshots([], NOW, pitr=False, why="dump-only")
    assert unjudged.problems == [] and not unjudged.pitr
    assert "no snapshot" in assess_snapshots([], NOW, pitr=True, why="WAL_ARCHIVE_DIR is set").problems[0]


# --- WAL continuity (pure) -----------------------------------------------------------------------------

def test_an_unbroken_archive_is_healthy() -> None:
    health = assess_wal(survey(9), None, NOW)
    assert health.problems == [] and (health.found, health.missing_in_flight, health.lost) == (8, 0, [])
    assert health.to_dict()["from"] == seg(2) and health.to_dict()["to"] == seg(9)


def test_a_lost_segment_in_the_middle_is_named() -> None:
    health = assess_wal(survey(9, [Hole(5, 5, ago(timedelta(hours=3))), Hole(7, 8, ago(timedelta(hours=2)))]), None,
                        NOW)
    assert [r.to_dict() for r in health.lost] == [{"from": seg(5), "to": seg(5), "segments": 1},
                                                  {"from": seg(7), "to": seg(8), "segments": 2}]
    assert health.found == 5 and health.missing_in_flight == 0
    assert len(health.problems) == 2 and seg(5) in health.problems[0] and "lost" in health.problems[0]
    assert f"{seg(7)} to {seg(8)} (2)" in health.problems[1]


def test_missing_segments_at_the_end_are_in_flight_not_lost() -> None:
    # A hole whose next segment was completed a minute ago may still be archiving (push-ahead stored that one).
    recent = Hole(8, 8, ago(timedelta(minutes=1)))
    health = assess_wal(survey(9, [recent]), None, NOW)
    assert health.problems == [] and health.missing_in_flight == 1 and health.lost == []
    # After the grace it is lost.
    later = assess_wal(survey(9, [recent]), None, NOW + IN_FLIGHT_GRACE + timedelta(minutes=1))
    assert [r.first for r in later.lost] == [seg(8)] and later.problems
    # Beyond the newest archived segment nothing is a gap; what the server completed since is in flight.
    server = ServerWal("db:5432", timeline=1, current_segment=seg(13))
    tail = assess_wal(survey(9), server, NOW)
    assert tail.problems == [] and tail.missing_in_flight == 3
    assert [r.to_dict() for r in tail.in_flight] == [{"from": seg(10), "to": seg(12), "segments": 3}]


def test_the_servers_archiver_decides_what_is_in_flight() -> None:
    holes = [Hole(4, 4, ago(timedelta(seconds=5))), Hole(8, 8, ago(timedelta(hours=1)))]
    server = ServerWal("db:5432", timeline=1, current_segment=seg(10), archiver=archiver(seg(6)))
    health = assess_wal(survey(9, holes), server, NOW)
    # 4 is below what PostgreSQL says it archived: lost however recent; 8 it has not archived yet.
    assert [r.first for r in health.lost] == [seg(4)] and [r.first for r in health.in_flight] == [seg(8)]
    assert health.missing_in_flight == 1 and len(health.problems) == 1
    # A hole across that point: lost up to it, in flight after it.
    split = assess_wal(survey(9, [Hole(5, 8, ago(timedelta(hours=1)))]), server, NOW)
    assert [r.to_dict() for r in split.lost] == [{"from": seg(5), "to": seg(6), "segments": 2}]
    assert [r.to_dict() for r in split.in_flight] == [{"from": seg(7), "to": seg(8), "segments": 2}]


def test_a_timeline_mismatch_is_named() -> None:
    ahead = assess_wal(survey(9), ServerWal("db:5432", timeline=2, current_segment=seg(12, 2)), NOW)
    assert ahead.server_timeline == 2 and ahead.timeline == 1
    assert len(ahead.problems) == 1 and "timeline 2" in ahead.problems[0] and "not being archived" in ahead.problems[0]
    behind = assess_wal(survey(9, newest_timeline=3), ServerWal("db:5432", timeline=1, current_segment=seg(10)), NOW)
    assert len(behind.problems) == 1 and "another server archived into it" in behind.problems[0]


def test_a_server_that_does_not_answer_is_reported() -> None:
    health = assess_wal(survey(9), ServerWal("db:5432", error="connection refused"), NOW)
    assert health.server_error == "connection refused"
    assert len(health.problems) == 1 and "did not answer (connection refused)" in health.problems[0]


def test_an_archive_that_is_missing_or_unreadable_is_named() -> None:
    assert "does not exist" in assess_wal(WalSurvey(archive="/wal", available=False), None, NOW).problems[0]
    assert "could not be read: boom" in assess_wal(WalSurvey(archive="/wal", error="boom"), None, NOW).problems[0]


def test_a_failing_archive_command_is_named_as_the_server_reported_it() -> None:
    """The archiver row the metrics expose (``failing`` decided by the server) is the one health judges."""
    server = ServerWal("db:5432", timeline=1, current_segment=seg(10), archiver=archiver(seg(9), failing=True))
    [problem] = assess_wal(survey(9), server, NOW).problems
    assert problem == (f"the server db:5432 fails to archive WAL: archive_command failed for {seg(10)} at "
                       f"2026-11-27T01:05:00.000000Z (last success: {seg(9)} at 2026-11-27T00:05:00.000000Z); "
                       f"see the server log")
    assert assess_wal(survey(9), replace(server, archiver=archiver(seg(9))), NOW).problems == []


# --- check_health: the memory catalog and a real archive directory ---------------------------------------

@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(backup_dir=str(tmp_path / "backups"), broker_url="memory://")


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage("catalog")


def store(storage: MemoryStorage, manifest: Manifest) -> Manifest:
    storage.put_bytes(manifest.path, b"x" * manifest.size_bytes)
    catalog.save_new(storage, manifest)
    return manifest


def push(archive: WalArchive, spool: Path, name: str, completed_ago: timedelta, content: bytes = b"") -> None:
    spool.mkdir(exist_ok=True)
    source = spool / name
    source.write_bytes(content or f"wal {name}".encode())
    moment = ago(completed_ago)
    os.utime(source, (moment, moment))  # the trailer's completion time
    archive.push(source)


def archive_of(tmp_path: Path, numbers: list[int]) -> WalArchive:
    archive = WalArchive.in_directory(tmp_path / "wal")
    for number in numbers:
        push(archive, tmp_path / "spool", seg(number), timedelta(hours=20 - number))
    return archive


def test_a_dump_only_deployment_stays_healthy(settings: Settings, storage: MemoryStorage, tmp_path: Path) -> None:
    newest = store(storage, dump(0.1, verified=True))
    report = check_health(settings, now=NOW, storage=storage, archive=WalArchive.in_directory(tmp_path / "no-archive"))
    assert report.ok and report.problems == [] and report.newest_backup == newest.id
    assert report.snapshot["pitr"] is False and "dump-only" in report.snapshot["why"]
    assert report.wal["checked"] is False


@pytest.mark.parametrize("window", [True, False], ids=["recovery-window", "no-restorable-from"])
def test_check_health_names_a_lost_segment_of_a_real_archive(settings: Settings, storage: MemoryStorage,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             window: bool) -> None:
    from backup_tasks.observe import continuity

    store(storage, dump(0.1, verified=True))
    store(storage, snapshot(13, verified=True, start=2, window=window))
    store(storage, snapshot(6, verified=True, start=7, window=window))
    archive = archive_of(tmp_path, [2, 3, 4, 6, 7, 8, 9])  # 5 is gone: recovery from the older snapshot stops
    walks: list[object] = []
    monkeypatch.setattr(continuity, "coverages", lambda *a, **k: walks.append(a) or coverages(*a, **k))
    report = check_health(settings, now=NOW, storage=storage, archive=archive)
    # With a recovery window the survey starts from the coverage the window was computed from: no second walk.
    assert len(walks) == (0 if window else 1)
    assert not report.ok and report.snapshot["pitr"] is True
    wal = report.wal
    assert (wal["from"], wal["to"], wal["found"], wal["missing_in_flight"]) == (seg(2), seg(9), 7, 0)
    assert wal["lost"] == [{"from": seg(5), "to": seg(5), "segments": 1}] and wal["unbroken_to"] == seg(4)
    assert wal["timeline"] == 1 and wal["server_timeline"] is None and wal["timelines"] == [1]
    assert len(report.problems) == 1 and seg(5) in report.problems[0]
    json.dumps(report.__dict__)  # what the Celery task returns must serialize

    push(archive, tmp_path / "spool", seg(5), timedelta(hours=15))  # put back: healthy again
    assert check_health(settings, now=NOW, storage=storage, archive=archive).ok


def test_check_health_follows_a_timeline_switch(settings: Settings, storage: MemoryStorage, tmp_path: Path) -> None:
    store(storage, dump(0.1, verified=True))
    store(storage, snapshot(3, verified=True, start=2))
    archive = archive_of(tmp_path, [2, 3, 4])
    spool = tmp_path / "spool"
    push(archive, spool, "00000002.history", timedelta(hours=1), b"1\t0/5000000\tno recovery target specified\n")
    for number in (5, 6):
        push(archive, spool, seg(number, 2), timedelta(minutes=50))
    report = check_health(settings, now=NOW, storage=storage, archive=archive)
    assert report.ok, report.problems
    assert report.wal["timelines"] == [1, 2] and report.wal["timeline"] == 2 and report.wal["to"] == seg(6, 2)
    (archive.path_for(seg(5, 2))).unlink()
    report = check_health(settings, now=NOW, storage=storage, archive=archive)
    assert report.wal["lost"] == [{"from": seg(5, 2), "to": seg(5, 2), "segments": 1}]


def test_the_health_task_raises_with_each_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's path: ``check_health`` -> ``HealthCheckFailed`` naming the problems (Sentry reports it)."""
    from backup_tasks.worker import tasks

    backups = tmp_path / "backups"
    for name in [n for n in os.environ if n.startswith(("BACKUP_", "WAL_", "SENTRY_"))] + ["DATABASE_URL"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BACKUP_DIR", str(backups))
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://")
    local = LocalStorage(backups)
    behind = (utcnow() - NOW).total_seconds() / 86400  # the task judges at the real clock, the data is at NOW
    for manifest in (dump(0.1 - behind, verified=True), snapshot(2 - behind, verified=True, start=2)):
        local.put_bytes(manifest.path, b"x" * manifest.size_bytes)
        catalog.save_new(local, manifest)
    archive = WalArchive.in_directory(backups / "wal")  # the default <BACKUP_DIR>/wal
    for number in (2, 4):
        push(archive, tmp_path / "spool", seg(number), timedelta(hours=10))
    with pytest.raises(HealthCheckFailed) as failed:
        tasks.health()
    assert "backups are unhealthy" in str(failed.value) and f"WAL segment {seg(3)} lost" in str(failed.value)
    push(archive, tmp_path / "spool", seg(3), timedelta(hours=10))
    result = tasks.health()  # healthy: the task's result is plain JSON
    assert json.loads(json.dumps(result))["wal"]["found"] == 3


def test_a_catalog_that_cannot_be_read_fails_the_check(settings: Settings, storage: MemoryStorage,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a problem line: the error itself, with its exit code and retry rule, as before the one reading."""
    def refuse(*_args: object, **_kwargs: object) -> list[object]:
        raise StorageError("memory://catalog: listing refused")

    monkeypatch.setattr(storage, "list", refuse)
    with pytest.raises(StorageError, match="listing refused"):
        check_health(settings, now=NOW, storage=storage)


def test_health_judges_the_reading_the_metrics_expose(settings: Settings, storage: MemoryStorage, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One reading of the server (``read_server_wal``) feeds both the archiver metrics and health's verdict."""
    from backup_tasks.observe import facts as observed
    from backup_tasks.observe.health import judge
    from backup_tasks.observe.metrics import families

    store(storage, dump(0.1, verified=True))
    store(storage, snapshot(3, verified=True, start=2))
    archive = archive_of(tmp_path, [2, 3, 4])
    reads: list[object] = []
    answer = ServerWal("db:5432", timeline=1, current_segment=seg(5), archiver=archiver(seg(4), failing=True))
    monkeypatch.setattr(observed, "read_server_wal", lambda conninfo: reads.append(conninfo) or answer)
    with_server = replace(settings, database_url="postgresql://postgres@db:5432/aitrapp")
    reading = observed.collect(with_server, storage=storage, archive=archive, now=NOW, for_health=True)
    report = judge(reading, with_server, "aitrapp")
    assert len(reads) == 1
    assert [p for p in report.problems if "fails to archive WAL" in p] == [
        f"the server db:5432 fails to archive WAL: archive_command failed for {seg(10)} at "
        f"2026-11-27T01:05:00.000000Z (last success: {seg(4)} at 2026-11-27T00:05:00.000000Z); see the server log"]
    exposed = {f.name: f.samples[0].value for f in families(reading) if f.name.startswith("backup_tasks_archiver")}
    assert exposed["backup_tasks_archiver_last_failed_timestamp_seconds"] == (NOW - timedelta(hours=1)).timestamp()
    assert report.wal["server_timeline"] == 1 and report.wal["missing_in_flight"] == 0


@pytest.mark.slow
def test_a_server_that_never_answers_costs_health_seconds(settings: Settings, storage: MemoryStorage,
                                                           tmp_path: Path) -> None:
    """The one timeout of ``postgres.archiver`` bounds health too; the silent server is named, the rest judged."""
    store(storage, dump(0.1, verified=True))
    store(storage, snapshot(3, verified=True, start=2))
    archive = archive_of(tmp_path, [2, 3, 4])
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        quiet = replace(settings, database_url=f"postgresql://postgres@127.0.0.1:{port}/aitrapp")
        started = time.monotonic()
        report = check_health(quiet, now=NOW, storage=storage, archive=archive)
        elapsed = time.monotonic() - started
    assert elapsed < SERVER_TIMEOUT + 3, f"health waited {elapsed:.1f}s on a silent server"
    assert "127.0.0.1" in report.wal["server_error"] and report.wal["found"] == 3
    assert [p for p in report.problems if "did not answer" in p] == report.problems and len(report.problems) == 1
