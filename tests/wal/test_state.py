"""The archive's state file: wal-push records the newest acknowledged segment per location, and never fails for it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.wal import state
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.command import push_and_record
from tests.support.paths import PYTHON, ROOT
from tests.support.pitr import PitrEnv, reachable_dir, switch_and_wait

SEGMENTS = [f"0000000100000000000000{n:02X}" for n in range(0x20, 0x24)]
IS_ROOT = os.geteuid() == 0
#: The console script's entry point, as PostgreSQL's archive_command runs it (the fast path).
ENTRY = "import sys\nfrom backup_tasks.entry import main\nsys.exit(main(sys.argv[1:]))\n"


def wal_file(pg_wal: Path, name: str, completed_at: float, size: int = 64 << 10) -> Path:
    """A WAL-like file whose mtime (what the trailer records as its completion) is ``completed_at``."""
    pg_wal.mkdir(parents=True, exist_ok=True)
    path = pg_wal / name
    path.write_bytes(name.encode().ljust(size, b"\0"))
    os.utime(path, (completed_at, completed_at))
    return path


def wal_push(archive_dir: Path, source: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", ENTRY, "wal-push", "--archive-dir", str(archive_dir), *options, str(source)],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)


def test_fast_path_wal_push_records_the_newest_segment(archive: WalArchive, tmp_path: Path) -> None:
    now = time.time()
    first = wal_file(tmp_path / "pg_wal", SEGMENTS[0], now - 120)
    second = wal_file(tmp_path / "pg_wal", SEGMENTS[1], now - 60)
    for source in (first, second):
        result = wal_push(archive.root, source)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""

    recorded = state.read(archive.root)
    assert set(recorded) == {"archive"}, "no copy configured: no copy entry"
    newest = recorded["archive"]
    assert newest.segment == SEGMENTS[1]
    assert newest.completed_at == pytest.approx(archive.trailer(SEGMENTS[1]).completed_at)
    assert newest.completed_at == pytest.approx(now - 60, abs=0.01)
    assert now - 5 < newest.stored_at < time.time() + 1
    assert newest.where == str(archive.root)
    assert stat.S_IMODE(state.state_path(archive.root).stat().st_mode) == 0o640  # group-readable: the exporter


def test_an_older_segment_pushed_again_never_moves_the_state_back(archive: WalArchive, tmp_path: Path) -> None:
    now = time.time()
    older = wal_file(tmp_path / "pg_wal", SEGMENTS[0], now - 120)
    newer = wal_file(tmp_path / "pg_wal", SEGMENTS[1], now - 60)
    push_and_record(archive, older)
    push_and_record(archive, newer)
    result = push_and_record(archive, older)  # PostgreSQL retries after a crash: already archived
    assert result.status == "already-archived"
    assert state.read(archive.root)["archive"].segment == SEGMENTS[1]


def test_history_and_backup_files_are_not_the_newest_wal(archive: WalArchive, tmp_path: Path) -> None:
    segment = wal_file(tmp_path / "pg_wal", SEGMENTS[0], time.time() - 60)
    push_and_record(archive, segment)
    history = tmp_path / "pg_wal" / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    push_and_record(archive, history)
    assert state.read(archive.root)["archive"].segment == SEGMENTS[0]


def test_with_a_copy_both_locations_are_recorded_and_a_refusing_copy_stays_behind(archive: WalArchive,
                                                                                   tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    now = time.time()
    first = wal_file(tmp_path / "pg_wal", SEGMENTS[0], now - 120)
    result = wal_push(archive.root, first, "--copy-to", str(copy))
    assert result.returncode == 0, result.stderr
    recorded = state.read(archive.root)
    assert recorded["copy"].segment == SEGMENTS[0]
    assert recorded["copy"].where == f"{copy}/wal"
    assert (copy / "wal" / SEGMENTS[0][:16] / f"{SEGMENTS[0]}.zst").is_file()

    shutil.rmtree(copy / "wal")
    (copy / "wal").write_text("not a directory: the copy refuses every write now")
    second = wal_file(tmp_path / "pg_wal", SEGMENTS[1], now - 60)
    result = wal_push(archive.root, second, "--copy-to", str(copy))
    assert result.returncode == 0, result.stderr  # acknowledged: the archive holds it, queued for the copy
    recorded = state.read(archive.root)
    assert recorded["archive"].segment == SEGMENTS[1], "stored in the local archive all the same"
    assert recorded["copy"].segment == SEGMENTS[0], "the copy's entry shows how far behind it is"

    result = wal_push(archive.root, second)  # BACKUP_COPY_TO removed from archive_command
    assert result.returncode == 0, result.stderr
    assert set(state.read(archive.root)) == {"archive"}, "no copy any more: its stale entry is dropped"


def test_a_state_that_cannot_be_written_never_fails_the_push(archive: WalArchive, tmp_path: Path) -> None:
    state.state_path(archive.root).mkdir()  # rename onto a directory fails
    source = wal_file(tmp_path / "pg_wal", SEGMENTS[0], time.time() - 60)
    result = wal_push(archive.root, source)
    assert result.returncode == 0, result.stderr
    assert "could not record" in result.stderr and "the segment itself is archived" in result.stderr
    assert archive.exists(SEGMENTS[0])
    assert not any(p.name.startswith(state.TEMP_MARK) for p in archive.root.iterdir()), "no temporary left behind"


def test_a_damaged_state_reads_as_unreadable_and_is_rewritten(archive: WalArchive, tmp_path: Path) -> None:
    state.state_path(archive.root).write_text('{"v": 1, "locations": {"archive": {"segm')
    with pytest.raises(state.StateUnreadable, match="damaged"):
        state.read(archive.root)
    push_and_record(archive, wal_file(tmp_path / "pg_wal", SEGMENTS[0], time.time() - 60))
    assert state.read(archive.root)["archive"].segment == SEGMENTS[0]


def test_concurrent_writers_end_with_the_newest(archive: WalArchive) -> None:
    now = time.time()
    entries = [(f"0000000100000001000000{n:02X}", now - 1000 + n) for n in range(40)]
    threads = [threading.Thread(target=state.record, args=(archive.root, name, completed),
                                kwargs={"copy_where": None, "copy_stored": False}) for name, completed in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state.read(archive.root)["archive"].segment == entries[-1][0]
    json.loads(state.state_path(archive.root).read_text())  # one whole document


@pytest.fixture
def held_lock(archive: WalArchive) -> Iterator[None]:
    fd = os.open(archive.root / state.LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o660)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_busy_state_skips_the_update_within_a_second(archive: WalArchive, held_lock: None) -> None:
    started = time.monotonic()
    state.record(archive.root, SEGMENTS[0], time.time(), copy_where=None, copy_stored=False)
    assert time.monotonic() - started < state.LOCK_WAIT + 0.5
    assert state.read(archive.root) == {}, "skipped: the next push records a newer segment"


def test_the_full_cli_wal_push_records_too(archive: WalArchive, tmp_path: Path) -> None:
    source = wal_file(tmp_path / "pg_wal", SEGMENTS[0], time.time() - 60)
    result = subprocess.run([PYTHON, "-m", "backup_tasks.cli", "wal-push", "--json", "--archive-dir",
                             str(archive.root), str(source)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert state.read(archive.root)["archive"].segment == SEGMENTS[0]


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the cluster as the postgres user")
def test_the_servers_archive_command_keeps_the_state_root_can_read() -> None:
    env = PitrEnv(reachable_dir("bt-test-state-"))
    try:
        with env.archiving_cluster() as source:
            segment = switch_and_wait(source.conninfo(), env.archive)
            deadline = time.monotonic() + 10
            while state.read(env.archive.root).get("archive", None) is None or \
                    state.read(env.archive.root)["archive"].segment < segment:
                assert time.monotonic() < deadline, "the state never showed the archived segment"
                time.sleep(0.05)
            newest = state.read(env.archive.root)["archive"]
            assert newest.segment == segment
            owner = state.state_path(env.archive.root).stat()
            assert owner.st_uid != 0, "written by the server's OS user"
            assert owner.st_gid == env.archive.root.stat().st_gid, "its group follows the archive (setgid)"
    finally:
        shutil.rmtree(env.base, ignore_errors=True)
