"""wal-push with BACKUP_COPY_TO at archive speed: push-ahead of ``.ready`` files and the copy markers.

The promise under test: wal-push exits 0 for a file only once it is in the local archive (fsynced)
and in the copy (or queued for a copy that did not take it in time: ``wal.backlog``), and only if
the archived object is the file PostgreSQL hands over now. Push-ahead
may store later files early, and their own calls may then answer from a marker without opening
the copy, but a marker exists only after the copy's put succeeded and proves nothing once stale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.errors import StorageUnavailable, WalConflict
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.storage.base import PARTIAL_MARK, Storage
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.locations import open_locations
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.backlog import Backlog
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.pushahead import CLAIM_PREFIX, MARKER_DIR, marker_path, push, pusher_pid
from backup_tasks.wal.ship import ship
from tests.support.crypto import write_identity_file
from tests.support.paths import PYTHON, ROOT
from tests.support.pitr import PitrEnv, reachable_dir
from tests.support.processes import worker_env
from tests.support.s3 import S3Server, free_port
from tests.support.wal import archived, fake_pg_wal, write_file

SEGMENTS = [f"0000000100000000000000{n:02X}" for n in range(0x10, 0x16)]
HISTORY = "00000002.history"
BACKUP_LABEL = "000000010000000000000011.00000028.backup"

# Runs the console script's entry point and tells whether boto3 was imported on the way.
PROBE = ("import sys\nfrom backup_tasks.entry import main\nrc = main(sys.argv[1:])\n"
         "print('BOTO=' + str(any(m.split('.')[0] in ('boto3', 'botocore') for m in sys.modules)))\nsys.exit(rc)\n")


def wal_push(archive_dir: Path, copy_to: str, source: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", PROBE, "wal-push", "--archive-dir", str(archive_dir), "--copy-to", copy_to,
                           str(source)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180, check=False)


def markers(archive: WalArchive) -> set[str]:
    """The copy markers (not the detached pusher's lock, claims or temporaries, whose names start with a dot)."""
    directory = archive.root / MARKER_DIR
    return {m for m in os.listdir(directory) if not m.startswith(".")} if directory.is_dir() else set()


def pusher_done(archive: WalArchive, timeout: float = 60) -> None:
    """Wait for the pusher a console-script call forked (it stores the files ahead after the call returned)."""
    deadline = time.monotonic() + timeout
    while pusher_pid(archive) is not None:
        assert time.monotonic() < deadline, "the detached pusher did not finish"
        time.sleep(0.01)


class Watched:
    """The copy location, recording every put and failing the puts of chosen keys."""

    def __init__(self, inner: Storage, archive: WalArchive, failing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.inner = inner
        self.archive = archive
        self.failing = set(failing)
        self.location = inner.location
        self.puts: list[str] = []
        self.strict = True

    def put_new(self, key: str, data: bytes) -> bool:
        name = key.rsplit("/", 1)[-1].removesuffix(".zst")
        if self.strict:  # (off where a test plants stale markers on purpose)
            assert not marker_path(self.archive, name).exists(), "a marker must never precede its put"
        self.puts.append(name)
        if name in self.failing:
            raise StorageUnavailable(f"writing {key}: the copy is down")
        return self.inner.put_new(key, data)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


@pytest.fixture
def local_copy(tmp_path: Path) -> tuple[WalArchive, Path]:
    """An archive with a local BACKUP_COPY_TO (in process: no S3 needed), and a pg_wal behind on archiving."""
    archive = WalArchive.in_directory(tmp_path / "archive", str(tmp_path / "copy"))
    archive.ensure()
    return archive, fake_pg_wal(tmp_path, [*SEGMENTS, HISTORY])


def watch(archive: WalArchive, failing: set[str] = frozenset()) -> tuple[WalArchive, Watched]:  # type: ignore[assignment]
    """The same archive with its copy watched: ``WalArchive`` takes any location as its copy."""
    assert archive.copy is not None
    watched = Watched(archive.copy, archive, failing)
    return WalArchive(archive.primary, watched, recipients=archive.recipients,  # type: ignore[arg-type]
                      identity_file=archive.identity_file), watched


# --- through the console script, against a real S3 server --------------------------------------------------

@pytest.mark.slow
def test_push_ahead_stores_the_ready_files_and_their_calls_never_touch_s3(
        tmp_path: Path, bucket_url: str, s3_env: S3Server) -> None:
    names = [*SEGMENTS[:4], HISTORY, BACKUP_LABEL]
    pg_wal = fake_pg_wal(tmp_path, names)
    archive = WalArchive.in_directory(tmp_path / "archive", bucket_url)
    archive.ensure()
    copy = open_locations(f"{bucket_url}/wal")
    first = wal_push(archive.root, bucket_url, pg_wal / SEGMENTS[0], worker_env(**s3_env.env()))
    assert first.returncode == 0, first.stderr
    archived(pg_wal, SEGMENTS[0])
    pusher_done(archive)
    for name in names:  # every .ready file is now stored in both places, byte for byte
        assert copy.read_bytes(object_key(name)) == archive.path_for(name).read_bytes(), name
    assert markers(archive) == set(names[1:]), "a marker for each file pushed ahead, none for the one asked for"

    # The copy is unreachable from now on: the following calls must answer from their markers.
    dead = worker_env(**s3_env.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"))
    for name in [HISTORY, *SEGMENTS[1:4], BACKUP_LABEL]:
        began = time.perf_counter()
        result = wal_push(archive.root, bucket_url, pg_wal / name, dead)
        assert result.returncode == 0, result.stderr
        assert "BOTO=False" in result.stdout, "acknowledged from the marker, without boto3"
        assert time.perf_counter() - began < 5
        archived(pg_wal, name)
    assert markers(archive) == set(), "markers are removed once their file is acknowledged"

    # A file with no marker still needs the copy: unreachable, it is queued for it (exit 0: the archive holds
    # it), never marked as if the copy had it.
    write_file(pg_wal, SEGMENTS[4], seed=1)
    (pg_wal / "archive_status" / f"{SEGMENTS[4]}.ready").touch()
    down = wal_push(archive.root, bucket_url, pg_wal / SEGMENTS[4], dead)
    assert down.returncode == 0 and "queued" in down.stderr, down.stderr
    assert markers(archive) == set()
    assert not copy.exists(object_key(SEGMENTS[4]))
    assert Backlog(archive.root).names() == [SEGMENTS[4]]
    # The copy back: the shipper sends it, and it is in both places.
    assert ship(archive, put_timeout=30).ok
    assert copy.read_bytes(object_key(SEGMENTS[4])) == archive.path_for(SEGMENTS[4]).read_bytes()


@pytest.mark.slow
def test_copy_down_is_queued_and_leaves_no_marker(tmp_path: Path, bucket_url: str, s3_env: S3Server) -> None:
    pg_wal = fake_pg_wal(tmp_path, SEGMENTS[:3])
    archive = WalArchive.in_directory(tmp_path / "archive", bucket_url)
    archive.ensure()
    dead = worker_env(**s3_env.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"))
    result = wal_push(archive.root, bucket_url, pg_wal / SEGMENTS[0], dead)
    assert result.returncode == 0, result.stderr
    assert markers(archive) == set(), "nothing may claim to be in a copy that could not be reached"
    assert Backlog(archive.root).names() == [SEGMENTS[0]], "queued for the copy instead"
    # Once the copy is back the shipper completes it; the next push pushes ahead again.
    assert ship(archive, put_timeout=30).ok
    result = wal_push(archive.root, bucket_url, pg_wal / SEGMENTS[0], worker_env(**s3_env.env()))
    assert result.returncode == 0, result.stderr
    copy = open_locations(f"{bucket_url}/wal")
    assert all(copy.exists(object_key(name)) for name in SEGMENTS[:3])
    assert markers(archive) == set(SEGMENTS[1:3])


# --- in process, with a local copy location ------------------------------------------------------------------

def test_markers_are_written_only_after_a_successful_put(local_copy: tuple[WalArchive, Path]) -> None:
    archive, pg_wal = local_copy
    archive, watched = watch(archive, failing={SEGMENTS[2]})  # (Watched asserts no marker precedes its put)
    push(archive, pg_wal / SEGMENTS[0])
    archived(pg_wal, SEGMENTS[0])
    for thread in threading.enumerate():  # files ahead already started finish in the background
        if thread.name.startswith("wal-push"):
            thread.join()
    marked = markers(archive)
    assert SEGMENTS[2] in watched.puts and SEGMENTS[2] not in marked, "no marker for the failed put"
    assert marked <= set(watched.puts) - {SEGMENTS[0]}, "a marker only for a file put ahead"
    assert archive.exists(SEGMENTS[2]), "stored locally all the same (harmless: its call finishes the job)"
    # The copy failed just now: the following calls answer from their markers, or queue their file for it.
    watched.failing.clear()
    for name in [HISTORY, *SEGMENTS[1:]]:
        watched.puts.clear()
        result = push(archive, pg_wal / name)
        assert result.copy == ("stored" if name in marked else "queued"), name
        assert watched.puts == [], "the copy was not asked"
        archived(pg_wal, name)
    assert ship(archive, put_timeout=5).ok  # the copy back: the shipper sends what it lacks
    for name in [*SEGMENTS, HISTORY]:
        assert watched.inner.read_bytes(object_key(name)) == archive.path_for(name).read_bytes(), name


def test_a_file_changed_after_push_ahead_is_a_conflict_never_a_success(local_copy: tuple[WalArchive, Path]) -> None:
    archive, pg_wal = local_copy
    copy = archive.copy
    assert copy is not None
    archive, _watched = watch(archive)
    push(archive, pg_wal / SEGMENTS[0])
    stored = archive.path_for(SEGMENTS[1]).read_bytes()
    write_file(pg_wal, SEGMENTS[1], seed=2)  # other content under the same name
    with pytest.raises(WalConflict, match="DIFFERENT content"):
        push(archive, pg_wal / SEGMENTS[1])
    assert archive.path_for(SEGMENTS[1]).read_bytes() == stored, "the archived object is untouched"
    assert copy.read_bytes(object_key(SEGMENTS[1])) == stored


def test_stale_or_damaged_markers_prove_nothing(local_copy: tuple[WalArchive, Path]) -> None:
    archive, pg_wal = local_copy
    archive, watched = watch(archive)
    push(archive, pg_wal / SEGMENTS[0])
    archived(pg_wal, SEGMENTS[0])
    watched.strict = False
    copy = watched.inner
    # 1. A marker written for another copy location (BACKUP_COPY_TO changed since).
    path = marker_path(archive, SEGMENTS[1])
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "copy": "s3://elsewhere/wal"}))
    copy.delete(object_key(SEGMENTS[1]))
    watched.puts.clear()
    push(archive, pg_wal / SEGMENTS[1])
    assert SEGMENTS[1] in watched.puts and copy.exists(object_key(SEGMENTS[1]))
    assert not marker_path(archive, SEGMENTS[1]).exists(), "the stale marker is gone once the file is acknowledged"
    archived(pg_wal, SEGMENTS[1])
    # 2. A damaged marker (a crash before its data reached the disk).
    marker_path(archive, SEGMENTS[2]).write_bytes(b"")
    copy.delete(object_key(SEGMENTS[2]))
    push(archive, pg_wal / SEGMENTS[2])
    assert copy.exists(object_key(SEGMENTS[2]))
    archived(pg_wal, SEGMENTS[2])
    # 3. The archived object was replaced since the marker was written (deleted and pushed again).
    archive.path_for(SEGMENTS[3]).unlink()
    archive.push(pg_wal / SEGMENTS[3], copy=False)
    copy.delete(object_key(SEGMENTS[3]))
    watched.puts.clear()
    push(archive, pg_wal / SEGMENTS[3])
    assert SEGMENTS[3] in watched.puts and copy.exists(object_key(SEGMENTS[3]))
    archived(pg_wal, SEGMENTS[3])
    # 4. A marker from two days ago (its file's call never came; WAL expiry may have run since).
    path = marker_path(archive, SEGMENTS[4])
    path.write_text(json.dumps({**json.loads(path.read_text()), "written_at": time.time() - 2 * 86400}))
    copy.delete(object_key(SEGMENTS[4]))
    watched.puts.clear()
    push(archive, pg_wal / SEGMENTS[4])
    assert SEGMENTS[4] in watched.puts
    assert copy.exists(object_key(SEGMENTS[4]))
    archived(pg_wal, SEGMENTS[4])
    # A marker that still matches is trusted: its file is not put again.
    watched.puts.clear()
    push(archive, pg_wal / SEGMENTS[5])
    assert watched.puts == []


def test_history_partial_and_backup_files_go_through_the_same_path(tmp_path: Path) -> None:
    names = [SEGMENTS[0], f"{SEGMENTS[1]}.partial", HISTORY, BACKUP_LABEL, SEGMENTS[2]]
    pg_wal = fake_pg_wal(tmp_path, names)
    archive = WalArchive.in_directory(tmp_path / "archive", str(tmp_path / "copy"))
    archive.ensure()
    archive, watched = watch(archive)
    push(archive, pg_wal / SEGMENTS[0])
    assert set(watched.puts) == set(names)
    watched.puts.clear()
    for name in names[1:]:
        assert push(archive, pg_wal / name).status == "already-archived"
        assert watched.inner.read_bytes(object_key(name)) == archive.path_for(name).read_bytes()
    assert watched.puts == []


def test_an_encrypted_archive_is_pushed_ahead_the_same_way(tmp_path: Path) -> None:
    public = write_identity_file(tmp_path / "identity.txt")
    pg_wal = fake_pg_wal(tmp_path, SEGMENTS[:3])
    archive = WalArchive.in_directory(tmp_path / "archive", str(tmp_path / "copy"), recipients=(public,),
                                      identity_file=tmp_path / "identity.txt")
    archive.ensure()
    archive, watched = watch(archive)
    push(archive, pg_wal / SEGMENTS[0])
    watched.puts.clear()
    for name in SEGMENTS[1:3]:
        assert push(archive, pg_wal / name).status == "already-archived"
        assert watched.inner.read_bytes(object_key(name)) == archive.path_for(name).read_bytes()
        archive.fetch(name, tmp_path / "restored")
        assert (tmp_path / "restored").read_bytes() == (pg_wal / name).read_bytes()
    assert watched.puts == []


@pytest.mark.slow
def test_overlapping_pushers_corrupt_nothing(tmp_path: Path) -> None:
    """A manual wal-push beside the server's: both push ahead the same files at once."""
    pg_wal = fake_pg_wal(tmp_path, SEGMENTS)
    archive = WalArchive.in_directory(tmp_path / "archive", str(tmp_path / "copy"))
    archive.ensure()
    env = worker_env()
    command = [PYTHON, "-c", PROBE, "wal-push", "--archive-dir", str(archive.root), "--copy-to", str(tmp_path / "copy")]
    both = [subprocess.Popen([*command, str(pg_wal / name)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for name in SEGMENTS[:2]]
    for proc in both:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    pusher_done(archive)
    copy = LocalStorage(tmp_path / "copy" / "wal")
    for name in SEGMENTS:
        assert copy.read_bytes(object_key(name)) == archive.path_for(name).read_bytes()
        assert push(archive, pg_wal / name).status == "already-archived"
    assert not [p for p in (tmp_path / "archive").rglob("*") if ".incoming-" in p.name or ".tmp-" in p.name
                or PARTIAL_MARK in p.name]


@pytest.mark.slow
def test_a_pusher_killed_mid_way_leaves_no_false_marker(tmp_path: Path) -> None:
    names = [f"0000000100000000000000{n:02X}" for n in range(0x20, 0x38)]
    pg_wal = fake_pg_wal(tmp_path, names)
    archive = WalArchive.in_directory(tmp_path / "archive", str(tmp_path / "copy"))
    archive.ensure()
    proc = subprocess.Popen([PYTHON, "-c", PROBE, "wal-push", "--archive-dir", str(archive.root), "--copy-to",
                             str(tmp_path / "copy"), str(pg_wal / names[0])], cwd=ROOT, env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 60
    while not markers(archive):  # the call returned; the pusher it forked stores the files ahead
        assert time.monotonic() < deadline
        time.sleep(0.002)
    pid = pusher_pid(archive)
    assert pid is not None, "killed while the pusher runs"
    os.kill(pid, 9)  # SIGKILL: mid-batch, no clean-up of any kind
    while pusher_pid(archive) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    copy = LocalStorage(tmp_path / "copy" / "wal")
    vouched = markers(archive)
    assert vouched, "killed after the first marker"
    # A file the killed pusher had claimed: its own call does not wait for a pusher that is gone.
    left = sorted(m.removeprefix(CLAIM_PREFIX) for m in os.listdir(archive.root / MARKER_DIR)
                  if m.startswith(CLAIM_PREFIX))
    if left:
        began = time.monotonic()
        result = wal_push(archive.root, str(tmp_path / "copy"), pg_wal / left[0], worker_env())
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - began < 10
        pusher_done(archive)
    for name in vouched:  # every marker left describes an object that is in the copy
        assert copy.read_bytes(object_key(name)) == archive.path_for(name).read_bytes(), name
    for name in names:  # and every file still completes, from its marker or the slow way
        assert push(archive, pg_wal / name).status in ("archived", "already-archived")
        archived(pg_wal, name)
        assert copy.read_bytes(object_key(name)) == archive.path_for(name).read_bytes()


# --- end to end: a real server archiving through wal-push into a bucket ------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the server as the postgres user")
def test_a_server_behind_on_archiving_gets_every_segment_into_the_copy(bucket_url: str, s3_env: S3Server) -> None:
    """A real server, archive_command = wal-push with a bucket copy: a backlog of segments, then steady writes.

    The backlog is made deterministic: the server starts without archive_command (segments pile up
    as ``.ready``, as when archiving is slower than the writes), then it is set and reloaded.
    """
    from backup_tasks.postgres.cluster import ThrowawayCluster

    base = reachable_dir("bt-test-pushahead-")
    try:
        env = PitrEnv(base)
        command = archive_command(env.command, env.archive.root, copy_to=bucket_url)
        # The server inherits this process's environment (s3_env): the AWS variables reach archive_command.
        with ThrowawayCluster(settings={"wal_level": "replica", "archive_mode": "on",
                                        "archive_timeout": "0"}) as cluster, connect(cluster.conninfo()) as conn:

            def switch() -> str:
                conn.execute("INSERT INTO t SELECT repeat('x', 100) FROM generate_series(1, 2000)")
                return str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])

            conn.execute("CREATE TABLE t (v text)")
            names = [switch() for _ in range(8)]
            conn.execute(f"ALTER SYSTEM SET archive_command = {sql_literal(command)}")
            conn.execute("SELECT pg_reload_conf()")
            names += [switch() for _ in range(4)]
            copy = open_locations(f"{bucket_url}/wal")
            deadline = time.monotonic() + 120
            while not all(env.archive.exists(name) and copy.exists(object_key(name)) for name in names):
                assert time.monotonic() < deadline, f"not all archived: {cluster.server_log()[-2000:]}"
                time.sleep(0.5)
            failed = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]
            assert failed == 0, cluster.server_log()[-2000:]
            for name in names:
                assert copy.read_bytes(object_key(name)) == env.archive.path_for(name).read_bytes()
            assert (env.archive.root / MARKER_DIR).is_dir(), "the backlog was pushed ahead"
            # Every marker is consumed by its own call once the server has archived everything.
            deadline = time.monotonic() + 60
            while markers(env.archive):
                assert time.monotonic() < deadline, markers(env.archive)
                time.sleep(0.2)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def test_a_claim_left_by_a_dead_pusher_is_not_waited_on(local_copy: tuple[WalArchive, Path]) -> None:
    """A pusher killed mid-file leaves its claim and an unheld lock: the file's own call stores it at once."""
    from backup_tasks.wal.pushahead import await_claimed, claim_path, pusher_lock_path

    archive, pg_wal = local_copy
    claim_path(archive, SEGMENTS[1]).parent.mkdir(parents=True, exist_ok=True)
    claim_path(archive, SEGMENTS[1]).touch()
    pusher_lock_path(archive).write_text("999999")  # its pid, but nobody holds the lock
    began = time.monotonic()
    assert await_claimed(archive, pg_wal / SEGMENTS[1]) is None
    assert time.monotonic() - began < 1
    assert push(archive, pg_wal / SEGMENTS[1], detach=True).copy == "stored"
