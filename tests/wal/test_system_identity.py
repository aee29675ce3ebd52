"""One system per WAL archive: wal-push refuses a segment of another PostgreSQL system (exit 2), naming both.

Two real clusters (the test server and a throwaway one) give real segments with different system
identifiers; the archive is a postgres-reachable directory, so the refusal is also seen by the
server's OS user reading the identity object root recorded (``storage.files.WAL_MODES``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import SystemMismatch
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import system_identifier
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import FILE_MODE
from backup_tasks.wal.system import IDENTITY_KEY, segment_system
from tests.support.pitr import PitrEnv, reachable_dir
from tests.support.wal import fake_segment


@pytest.fixture(scope="module")
def other_cluster() -> Iterator[ThrowawayCluster]:
    with ThrowawayCluster() as cluster:
        yield cluster


def current_segment(conninfo: ConnInfo, into: Path) -> tuple[Path, str]:
    """A copy of the segment the server is writing now (its first page is written), and the server's system."""
    with connect(conninfo) as conn:
        data_dir = str(conn.execute("SHOW data_directory").fetchone()[0])
        name = str(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])
        system = system_identifier(conn)
    into.mkdir(parents=True, exist_ok=True)
    copy = into / name
    shutil.copyfile(Path(data_dir) / "pg_wal" / name, copy)
    copy.chmod(0o644)  # the postgres OS user pushes it too
    return copy, system


@pytest.fixture
def pitr_env() -> Iterator[PitrEnv]:
    base = reachable_dir("bt-test-sysid-")
    try:
        yield PitrEnv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="reads the servers' pg_wal and acts as the postgres user")
def test_a_segment_of_another_system_is_refused_with_exit_2_naming_both(
        pg_admin: ConnInfo, other_cluster: ThrowawayCluster, pitr_env: PitrEnv) -> None:
    ours, our_system = current_segment(pg_admin, pitr_env.base / "ours")
    theirs, their_system = current_segment(other_cluster.conninfo(), pitr_env.base / "theirs")
    assert our_system != their_system
    # The identifier is read from the segment's long page header, as the server wrote it.
    assert segment_system(ours) == our_system and segment_system(theirs) == their_system
    assert segment_system(fake_segment(pitr_env.base / "fake")) is None, "no WAL header: nothing to claim"

    archive = pitr_env.archive
    assert archive.push(ours).status == "archived"  # root, first: the archive is this system's now
    identity = archive.root / IDENTITY_KEY
    assert json.loads(identity.read_text())["system_identifier"] == our_system
    assert stat.S_IMODE(identity.stat().st_mode) == FILE_MODE, "readable by the server's OS user"

    def push_as_server(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *pitr_env.command, "wal-push", "--archive-dir",
                               str(archive.root), str(path)], capture_output=True, text=True, check=False, cwd="/")

    refused = push_as_server(theirs)
    assert refused.returncode == 2, refused.stderr
    assert our_system in refused.stderr and their_system in refused.stderr, refused.stderr
    assert "WAL_ARCHIVE_DIR" in refused.stderr, "says what to do"
    assert not archive.exists(theirs.name) or theirs.name == ours.name, "nothing of theirs was stored"
    again = push_as_server(ours)  # our own segment, retried by the server: acknowledged as before
    assert again.returncode == 0, again.stderr
    with pytest.raises(SystemMismatch) as caught:
        WalArchive.in_directory(archive.root).push(theirs)
    assert caught.value.exit_code == 2


def test_the_check_costs_little_per_push(pg_admin: ConnInfo, tmp_path: Path) -> None:
    """The per-push cost: a 40-byte read of the segment and a read of the identity object (printed: see -s)."""
    from backup_tasks.wal.system import check_push

    archive = WalArchive.in_directory(tmp_path / "wal")
    archive.ensure()
    try:
        segment, _system = current_segment(pg_admin, tmp_path / "pg_wal")
    except PermissionError:
        pytest.skip("the server's pg_wal is not readable here")
    check_push(archive.primary, segment)  # records it
    rounds = 2000
    began = time.perf_counter()
    for _ in range(rounds):
        check_push(archive.primary, segment)
    each = (time.perf_counter() - began) / rounds
    print(f"system check per wal-push: {each * 1e6:.0f} µs")
    assert each < 0.005
