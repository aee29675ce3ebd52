"""The copy as a full source (issue 18, item 3): readers see the archive and ``BACKUP_COPY_TO``'s ``wal/`` as one.

A lost or damaged archive disk is the case the copy exists for: segments and history files that only
the copy holds are seen by coverage and planning (one listing of the copy), fetched from there, and a
point-in-time recovery reaches its target exactly. A copy that cannot be read leaves the local archive
readable, and says so.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import coverage
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import position, segment_name
from tests.support.pitr import PitrEnv, cli_env, marks, reachable_dir, run_cli, stop_restored
from tests.support.s3 import S3Server, free_port
from tests.support.wal import fake_segment

SIZE = 64 << 10  # small segments: what is read here are names, listings and trailers
HISTORY = "00000002.history"


def count_listings(storage: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``list`` call made on ``storage`` from now on (its prefix)."""
    calls: list[str] = []
    original = storage.list

    def counted(prefix: str = "", **kwargs: Any) -> Any:
        calls.append(prefix)
        return original(prefix, **kwargs)

    monkeypatch.setattr(storage, "list", counted)
    return calls


@pytest.mark.slow
def test_readers_see_the_archive_and_its_copy_as_one(tmp_path: Path, s3_env: S3Server,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    copy_to = f"s3://{s3_env.new_bucket()}/prod"
    pushing = WalArchive.in_directory(tmp_path / "wal", copy_to)
    pushing.ensure()
    names = [segment_name(1, number, SIZE) for number in range(1, 13)]
    for number, name in enumerate(names, start=1):
        pushing.push(fake_segment(tmp_path / "pg_wal", name, size=SIZE, seed=number))
    (tmp_path / "pg_wal" / HISTORY).write_text("1\t0/3200000\tno recovery target specified\n")  # far ahead
    pushing.push(tmp_path / "pg_wal" / HISTORY)
    lost = [names[3], names[4], names[10], names[11], HISTORY]  # a damaged disk: the middle, the end, a history
    for name in lost:
        (pushing.root / object_key(name)).unlink()

    archive = WalArchive.in_directory(tmp_path / "wal", copy_to)
    listings = count_listings(archive.copy, monkeypatch)
    assert archive.segment_names() == names
    assert archive.segment_runs() == {1: [(0, 1, 12)]}
    assert archive.history_names() == [HISTORY]
    assert archive.read_text(HISTORY).startswith("1\t0/3200000")
    assert archive.exists(names[10]) and not archive.exists(segment_name(1, 13, SIZE))
    assert archive.trailer(names[11]).size == SIZE
    cov = coverage(archive, names[0], SIZE)
    assert (cov.end_segment, cov.gap, cov.segments) == (names[-1], None, 12)
    assert cov.end_completed_at == archive.trailer(names[-1]).completed_at
    assert listings == [""], "one listing of the copy answers every question"
    assert archive.copy_problem is None
    restored = tmp_path / "RECOVERYXLOG"
    assert archive.fetch(names[4], restored) == SIZE
    assert restored.read_bytes() == (tmp_path / "pg_wal" / names[4]).read_bytes()

    # What stays the local archive's alone: WAL expiry's index, and a reader that opts out (the exporter).
    local_names = [n for n in names if n not in lost]
    assert [n for n in archive.index().names() if n in names] == local_names
    alone = WalArchive.in_directory(tmp_path / "wal", copy_to, read_copy=False)
    assert alone.segment_names() == local_names and alone.history_names() == []

    # A look at the state (list, health): the copy is listed only once a reader found a hole to fill.
    looking = WalArchive.in_directory(tmp_path / "wal", copy_to, copy_on_gap=True)
    listings = count_listings(looking.copy, monkeypatch)
    assert looking.segment_names() == local_names and listings == []
    assert coverage(looking, names[0], SIZE).gap is not None, "the local archive alone has a hole"
    assert looking.see_the_copy() and not looking.see_the_copy()
    assert coverage(looking, names[0], SIZE).gap is None and listings == [""]


def test_an_unreadable_copy_leaves_the_local_archive_readable(tmp_path: Path, s3_env: S3Server,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Planning from a local archive that covers the target must not fail with the copy; asked once, said once."""
    archive = WalArchive.in_directory(tmp_path / "wal")
    archive.ensure()
    names = [segment_name(1, number, SIZE) for number in range(1, 6)]
    for number, name in enumerate(names, start=1):
        archive.push(fake_segment(tmp_path / "pg_wal", name, size=SIZE, seed=number))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    reader = WalArchive.in_directory(tmp_path / "wal", f"s3://{s3_env.new_bucket()}/prod")
    with caplog.at_level(logging.WARNING):
        assert reader.segment_runs() == {1: [(0, 1, 5)]}
    assert reader.copy_problem is not None and "did not answer" in reader.copy_problem
    assert sum("cannot read the WAL copy" in r.getMessage() for r in caplog.records) == 1
    began = time.monotonic()
    assert reader.segment_names() == names and reader.history_names() == []
    assert not reader.exists(segment_name(1, 6, SIZE))
    assert coverage(reader, names[0], SIZE).end_segment == names[-1]
    assert time.monotonic() - began < 1, "the copy is not asked again"


# --- the incident, end to end ------------------------------------------------------------------------------

def wait_in_copy(archive: WalArchive, names: list[str], timeout: float = 60) -> None:
    """Wait until archive_command stored each of ``names`` in the copy too."""
    assert archive.copy is not None
    deadline = time.monotonic() + timeout
    for name in names:
        while not archive.copy.exists(object_key(name)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not reach the copy within {timeout}s")
            time.sleep(0.1)


@pytest.mark.slow
def test_restore_pitr_reaches_the_target_from_segments_only_in_the_copy(s3_env: S3Server) -> None:
    """The local archive lost segments in the middle of the recovery path and at its end; the copy holds them.

    One row per transaction, a segment switch after every other one, each commit time read back
    (``track_commit_timestamp``): the restore to a moment between two commits brings back exactly the rows
    committed before it.
    """
    env = PitrEnv(reachable_dir("bt-test-copy-only-"))
    copy_to = f"s3://{s3_env.new_bucket()}/prod"
    data_dir = env.base / "restored" / "data"
    try:
        command = archive_command(env.command, env.archive.root, copy_to)
        cluster = ThrowawayCluster(settings={"wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on",
                                             "archive_command": shlex.quote(command), "archive_timeout": "0",
                                             "track_commit_timestamp": "on"})
        committed: list[datetime] = []
        switched: list[str] = []
        with cluster as source:
            conninfo = source.conninfo()
            settings = env.for_cluster(source, copy_to=copy_to)
            with connect(conninfo) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
            snapshot = take_snapshot(settings)
            for row in range(1, 11):
                with connect(conninfo) as conn:
                    conn.execute("INSERT INTO marks VALUES (%s, 'committed')", (row,))
                    committed.append(conn.execute("SELECT pg_xact_commit_timestamp(xmin) FROM marks WHERE id = %s",
                                                  (row,)).fetchone()[0])
                    if row % 2 == 0:
                        switched.append(str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]))
                time.sleep(0.2)
            archive = WalArchive.in_directory(env.archive.root, copy_to)
            wait_in_copy(archive, switched)
        after = [n for n in archive.segment_names() if position(n) > position(str(snapshot.stop_segment))]
        lost = after[:2] + after[3:]  # the first segments after the snapshot, and the newest ones: one stays
        assert len(after) >= 5 and switched[-1] in lost
        for name in lost:
            (env.archive.root / object_key(name)).unlink()

        target = committed[6] + (committed[7] - committed[6]) / 2  # between the 7th and the 8th commit
        assert committed[7] - committed[6] > timedelta(milliseconds=100)
        restore_env = cli_env(settings, BACKUP_COPY_TO=copy_to)
        data_dir.parent.mkdir()
        data_dir.parent.chmod(0o711)
        result = run_cli("restore-pitr", "--json", "--data-dir", str(data_dir), "--target-time", target.isoformat(),
                         "--start", env=restore_env)
        report = json.loads(result.stdout) if result.stdout.strip() else {}
        assert result.returncode == 0 and report.get("ok"), (result.stdout, result.stderr)
        assert marks(report["port"]) == list(range(1, 8)), "exactly the rows committed before the target"
        assert "recovery stopping before commit" in report["outcome"]["stop_reason"]
        listed = run_cli("list", "--json", env=restore_env)
        assert listed.returncode == 0, listed.stderr
        assert [r["wal_gap"] for r in json.loads(listed.stdout)["restorable"]] == [None]
    finally:
        stop_restored([data_dir])
        shutil.rmtree(env.base, ignore_errors=True)
