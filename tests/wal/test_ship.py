"""The copy never holds the server: wal-push's bound, the backlog, the shipper, the local archive failing, drops.

In process, against local locations wrapped to hang or refuse (the same ``WalArchive`` over any pair
of locations), and through the console script where the process itself is the point (a hung
copy must not keep ``wal-push`` alive). The outage of a real bucket under a real server's load is
``test_copy_outage.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.errors import StorageUnavailable, WalArchiveError
from backup_tasks.storage.base import Storage
from backup_tasks.storage.local import LocalStorage
from backup_tasks.wal import dropped, state
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.backlog import BACKLOG_DIR, Backlog
from backup_tasks.wal.command import push_and_record
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.ship import ship
from tests.support.paths import PYTHON, ROOT
from tests.support.processes import worker_env
from tests.support.wal import archived, fake_pg_wal

SEGMENTS = [f"0000000100000000000000{n:02X}" for n in range(0x10, 0x16)]

ENTRY = "import sys\nfrom backup_tasks.entry import main\nsys.exit(main(sys.argv[1:]))\n"


class Copy:
    """The copy location, able to hang (until released) or refuse; records each put's key."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.location = inner.location
        self.answering = threading.Event()
        self.answering.set()
        self.refusing = False
        self.put_delay = 0.0
        self.puts: list[str] = []

    def put_new(self, key: str, data: bytes) -> bool:
        self.puts.append(key.rsplit("/", 1)[-1].removesuffix(".zst"))
        if self.refusing:
            raise StorageUnavailable(f"writing {key}: connection refused")
        self.answering.wait(30)  # a hung endpoint (released by the test)
        time.sleep(self.put_delay)
        return self.inner.put_new(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[WalArchive, Copy, Path]:
    """A local archive whose copy (a local directory) can hang or refuse, and a pg_wal behind on archiving."""
    local = WalArchive.in_directory(tmp_path / "archive", str(tmp_path / "copy"))
    local.ensure()
    assert local.copy is not None
    copy = Copy(local.copy)
    archive = WalArchive(local.primary, copy)  # type: ignore[arg-type]
    return archive, copy, fake_pg_wal(tmp_path, SEGMENTS[:4])


def in_copy(copy: Copy, archive: WalArchive, name: str) -> bool:
    key = object_key(name)
    return copy.inner.exists(key) and copy.inner.read_bytes(key) == archive.path_for(name).read_bytes()


@pytest.mark.slow
def test_a_hung_copy_costs_one_bound_then_nothing_and_the_shipper_catches_up_in_order(
        setup: tuple[WalArchive, Copy, Path]) -> None:
    archive, copy, pg_wal = setup
    assert archive.root is not None
    copy.answering.clear()
    began = time.monotonic()
    first = push_and_record(archive, pg_wal / SEGMENTS[0], copy_within=0.5)
    assert time.monotonic() - began < 1.5, "held no longer than the bound"
    assert (first.status, first.copy) == ("archived", "queued")
    backlog = Backlog(archive.root)
    assert backlog.names() == [SEGMENTS[0]], "queued; nothing was pushed ahead of a copy that did not answer"
    entry = archive.root / BACKLOG_DIR / SEGMENTS[0]
    assert json.loads(entry.read_text())["copy"] == copy.location and oct(entry.stat().st_mode)[-3:] == "640"
    archived(pg_wal, SEGMENTS[0])
    recorded = state.read(archive.root)
    assert recorded["archive"].segment == SEGMENTS[0] and "copy" not in recorded
    assert recorded.backlog.files == 1 and recorded.backlog.oldest == SEGMENTS[0]

    # Behind the backlog the copy is not tried again within RETRY_SECONDS: local speed, queued in order.
    puts = len(copy.puts)
    for name in SEGMENTS[1:3]:
        began = time.monotonic()
        result = push_and_record(archive, pg_wal / name, copy_within=0.5)
        assert time.monotonic() - began < 0.5 and (result.status, result.copy) == ("archived", "queued")
        archived(pg_wal, name)
    assert len(copy.puts) == puts, "the copy was left alone"
    assert backlog.names() == SEGMENTS[:3]
    assert state.read(archive.root)["archive"].segment == SEGMENTS[2]

    # The copy answers again: the shipper sends everything, the state's copy entry catches up.
    copy.answering.set()
    report = ship(archive, put_timeout=5)
    assert report.ok and report.error is None and not report.busy, report
    assert sorted([*report.shipped, *report.already_there]) == SEGMENTS[:3]
    assert backlog.names() == [] and backlog.last_failure() is None
    assert all(in_copy(copy, archive, name) for name in SEGMENTS[:3])
    assert state.read(archive.root)["copy"].segment == SEGMENTS[2]

    # With nothing queued, wal-push stores in both before it answers, as ever.
    result = push_and_record(archive, pg_wal / SEGMENTS[3], copy_within=5)
    assert (result.status, result.copy) == ("archived", "stored") and in_copy(copy, archive, SEGMENTS[3])
    assert state.read(archive.root)["copy"].segment == SEGMENTS[3]


def test_wal_push_ships_the_backlog_itself_once_the_copy_may_answer(setup: tuple[WalArchive, Copy, Path]) -> None:
    archive, copy, pg_wal = setup
    assert archive.root is not None
    copy.refusing = True
    assert push_and_record(archive, pg_wal / SEGMENTS[0], copy_within=2).copy == "queued"
    archived(pg_wal, SEGMENTS[0])
    copy.refusing = False
    assert push_and_record(archive, pg_wal / SEGMENTS[1], copy_within=2).copy == "queued", "not retried so soon"
    archived(pg_wal, SEGMENTS[1])
    failed = archive.root / BACKLOG_DIR / ".failed"
    os.utime(failed, (time.time() - 60, time.time() - 60))  # the failure is a minute old now
    result = push_and_record(archive, pg_wal / SEGMENTS[2], copy_within=2)
    assert result.copy == "stored", "shipped the backlog, its own file last"
    assert Backlog(archive.root).names() == [] and not failed.exists()
    assert all(in_copy(copy, archive, name) for name in SEGMENTS[:3])
    assert state.read(archive.root)["copy"].segment == SEGMENTS[2]


def queue_while_refused(archive: WalArchive, copy: Copy, pg_wal: Path, names: list[str]) -> None:
    """``names`` pushed (and marked done, as the archiver would) while the copy refuses: all queued for it."""
    copy.refusing = True
    for name in names:
        assert push_and_record(archive, pg_wal / name, copy_within=1).copy == "queued"
        archived(pg_wal, name)
    copy.refusing = False


def test_concurrent_shippers_never_send_a_file_twice(setup: tuple[WalArchive, Copy, Path]) -> None:
    archive, copy, pg_wal = setup
    assert archive.root is not None
    queue_while_refused(archive, copy, pg_wal, SEGMENTS[:4])
    copy.put_delay = 0.2
    copy.puts.clear()
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(ship(archive, put_timeout=5))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.busy for r in reports) == [False, True, True]
    assert sorted(copy.puts) == SEGMENTS[:4], "each file put once"
    assert all(in_copy(copy, archive, name) for name in SEGMENTS[:4])


def test_a_damaged_archived_object_is_never_shipped(setup: tuple[WalArchive, Copy, Path]) -> None:
    archive, copy, pg_wal = setup
    assert archive.root is not None
    queue_while_refused(archive, copy, pg_wal, SEGMENTS[:2])
    damaged = bytearray(archive.path_for(SEGMENTS[0]).read_bytes())
    damaged[100] ^= 0xFF
    os.chmod(archive.path_for(SEGMENTS[0]), 0o640)
    archive.path_for(SEGMENTS[0]).write_bytes(bytes(damaged))
    report = ship(archive, put_timeout=5)
    assert list(report.failed) == [SEGMENTS[0]] and "damaged" in report.failed[SEGMENTS[0]]
    assert not copy.inner.exists(object_key(SEGMENTS[0])) and in_copy(copy, archive, SEGMENTS[1])
    assert Backlog(archive.root).names() == [SEGMENTS[0]], "still what the copy lacks"
    assert "copy" not in state.read(archive.root), "the copy's entry never passes the hole"


def wal_push(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", ENTRY, "wal-push", *args], capture_output=True, text=True, cwd=ROOT,
                          env=worker_env(), timeout=60, check=False)


def test_the_archive_refusing_sends_the_file_to_the_copy_alone_and_says_so(tmp_path: Path) -> None:
    pg_wal = fake_pg_wal(tmp_path, SEGMENTS[:1])
    gone = tmp_path / "unmounted" / "archive"  # its parent is missing too: wal-push never creates that
    result = wal_push("--archive-dir", str(gone), "--copy-to", str(tmp_path / "copy"), str(pg_wal / SEGMENTS[0]))
    assert result.returncode == 0, result.stderr
    assert "ONLY" in result.stderr and str(gone) in result.stderr
    copy = LocalStorage(tmp_path / "copy" / "wal")
    assert copy.exists(object_key(SEGMENTS[0])) and not gone.exists()


def test_nothing_writable_fails_unless_the_drop_bound_is_passed_then_drops_loudly(tmp_path: Path) -> None:
    pg_wal = fake_pg_wal(tmp_path, SEGMENTS[:3])  # 3 x 2 MiB waiting
    gone = tmp_path / "unmounted" / "archive"
    refusing = tmp_path / "copy"
    (refusing / "wal").parent.mkdir()
    (refusing / "wal").write_text("not a directory: every write refused")
    push = ["--archive-dir", str(gone), "--copy-to", str(refusing)]
    result = wal_push(*push, "--drop-after", str(7 << 20), str(pg_wal / SEGMENTS[0]))
    assert result.returncode == 1 and "did not take" in result.stderr, "under the bound: PostgreSQL keeps it"
    result = wal_push(*push, "--drop-after", str(5 << 20), str(pg_wal / SEGMENTS[0]))
    assert result.returncode == 0, result.stderr
    assert "DROPPED" in result.stderr and SEGMENTS[0] in result.stderr
    fallback = tmp_path / dropped.FALLBACK_DIR / SEGMENTS[0]  # the archive cannot take the record: beside pg_wal
    assert json.loads(fallback.read_text())["waiting_bytes"] == 6 << 20
    archived(pg_wal, SEGMENTS[0])

    # The archive back: the next push stores its file and takes the record in; health and metrics see it.
    archive = WalArchive.in_directory(gone)
    gone.parent.mkdir()
    archive.ensure()
    assert wal_push("--archive-dir", str(gone), str(pg_wal / SEGMENTS[1])).returncode == 0
    assert not fallback.exists()
    [record] = state.read(archive.root).dropped
    assert record.name == SEGMENTS[0] and not record.reported
    assert dropped.unresolved([record], None) == [record]
    assert dropped.unresolved([record], SEGMENTS[1]) == [], "a snapshot starting after it resolves it"


def test_a_queue_that_cannot_be_written_is_no_acknowledgement(setup: tuple[WalArchive, Copy, Path]) -> None:
    archive, copy, pg_wal = setup
    assert archive.root is not None
    copy.refusing = True
    (archive.root / BACKLOG_DIR).write_text("a file where the queue's directory goes")
    with pytest.raises(WalArchiveError, match="could not be queued"):
        push_and_record(archive, pg_wal / SEGMENTS[0], copy_within=1)


def test_dropped_wal_fails_health_and_counts_until_a_later_snapshot(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from backup_tasks.observe.facts import Facts
    from backup_tasks.observe.metrics import families
    from backup_tasks.observe.wal_copy import CopyReading, assess_copy

    records = [dropped.Dropped(name, time.time(), 9 << 30, 8 << 30, 16 << 20, "disk full; bucket down")
               for name in SEGMENTS[1:4]]
    now = datetime.now(UTC)
    section, problems = assess_copy(CopyReading("s3://b/x", backlog=Backlog(tmp_path).count(), dropped=records),
                                    [], now)
    assert section["dropped"] == [{"from": SEGMENTS[1], "to": SEGMENTS[3], "files": 3}]
    [problem] = problems
    assert f"{SEGMENTS[1]} to {SEGMENTS[3]} (3 files) was DROPPED" in problem and "take a snapshot" in problem
    facts = Facts(collected_at=now, backup_dir=str(tmp_path), copy_to=None,
                  wal=state.Recorded({}, backlog=Backlog(tmp_path).count(), dropped_wal=records))
    found = {f.name: f.samples[0].value for f in families(facts) if f.name.startswith("backup_tasks_wal_")}
    assert found["backup_tasks_wal_dropped_segments"] == 3 and found["backup_tasks_wal_copy_backlog_segments"] == 0


def test_the_beat_task_ships_every_minute_with_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     setup: tuple[WalArchive, Copy, Path]) -> None:
    from backup_tasks.settings import Settings
    from backup_tasks.worker.config import beat_schedule
    from backup_tasks.worker.tasks import wal_ship

    archive, copy, pg_wal = setup
    assert archive.root is not None
    copy.refusing = True
    push_and_record(archive, pg_wal / SEGMENTS[0], copy_within=1)
    for name, value in {"BACKUP_DIR": str(tmp_path), "WAL_ARCHIVE_DIR": str(archive.root),
                        "BACKUP_COPY_TO": str(tmp_path / "copy"), "DATABASE_URL": ""}.items():
        monkeypatch.setenv(name, value)
    result = wal_ship()
    assert result["ok"] and result["shipped"] == [SEGMENTS[0]], result
    assert in_copy(copy, archive, SEGMENTS[0])
    entry = beat_schedule(Settings.from_env({"BACKUP_COPY_TO": str(tmp_path / "copy")}))["wal-ship"]
    assert entry["task"] == "backup_tasks.wal_ship" and entry["schedule"].minute == set(range(60))
    assert "wal-ship" not in beat_schedule(Settings()), "nothing to ship without a copy"
