"""The archive out of the box: wal-push creates a missing archive it may create; `check` judges by the outcome.

wal-push runs here as the postgres OS user, under the umask 077 PostgreSQL gives its children, in the
two forms an archive_command takes: ``--archive-dir DIR`` (the fast path) and ``BACKUP_DIR=... wal-push``
(the full CLI, settings from the environment).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.postgres.cluster import SERVER_USER, ThrowawayCluster, as_server_user
from backup_tasks.postgres.servercmd import server_command
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import DIR_MODE, FILE_MODE
from tests.support.pitr import cli_env, reachable_dir, run_cli
from tests.support.wal import SEGMENT, fake_segment

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the postgres OS user")

#: What wal-push says when it cannot make the archive itself (unchanged: the operator's cue to run check).
CANNOT_CREATE = "does not exist (or this user cannot reach it); create it with `backup-tasks check` as root"


@pytest.fixture
def base() -> Iterator[Path]:
    path = reachable_dir("bt-test-archive-setup-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def command(base: Path) -> list[str]:
    """A ``backup-tasks`` the postgres user can run (this install, or a portable copy)."""
    return server_command(base / "tool")


def postgres_dir(path: Path, mode: int = 0o700) -> Path:
    """A directory owned by the postgres user, as the image's /backups (and so a fresh named volume) is."""
    path.mkdir()
    shutil.chown(path, SERVER_USER, SERVER_USER)
    os.chmod(path, mode)
    return path


def server_segment(base: Path) -> Path:
    """A segment in a pg_wal-like directory the postgres user owns (and so can read)."""
    pg_wal = postgres_dir(base / "pg_wal")
    segment = fake_segment(pg_wal)
    shutil.chown(segment, SERVER_USER, SERVER_USER)
    os.chmod(segment, 0o600)
    return segment


def as_server(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` as PostgreSQL runs archive_command: its OS user, umask 077, only the given environment."""
    clean = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run([*as_server_user(), "env", "-i", *(f"{k}={v}" for k, v in clean.items()),
                           "sh", "-c", 'umask 077 && exec "$@"', "sh", *argv],
                          capture_output=True, text=True, check=False, cwd="/", timeout=120)


def assert_documented_modes(archive_dir: Path, name: str = SEGMENT) -> None:
    archive = WalArchive.in_directory(archive_dir)
    stored = archive.path_for(name)
    assert stat.S_IMODE(archive_dir.stat().st_mode) == DIR_MODE == 0o2770, oct(archive_dir.stat().st_mode)
    assert stat.S_IMODE(stored.parent.stat().st_mode) == DIR_MODE
    assert stat.S_IMODE(stored.stat().st_mode) == FILE_MODE == 0o640, oct(stored.stat().st_mode)


def test_wal_push_creates_a_missing_archive_directory_in_a_parent_it_owns(base: Path, command: list[str]) -> None:
    backups = postgres_dir(base / "backups")
    segment = server_segment(base)
    archive_dir = backups / "wal"
    result = as_server([*command, "wal-push", "--archive-dir", str(archive_dir), str(segment)])
    assert result.returncode == 0, result.stderr
    assert_documented_modes(archive_dir)
    restored = base / "restored"
    assert WalArchive.in_directory(archive_dir).fetch(SEGMENT, restored) == segment.stat().st_size
    assert restored.read_bytes() == segment.read_bytes()
    again = as_server([*command, "wal-push", "--archive-dir", str(archive_dir), str(segment)])
    assert again.returncode == 0, again.stderr  # the archive now exists: the ordinary path


def test_wal_push_from_backup_dir_creates_the_archive_too(base: Path, command: list[str]) -> None:
    backups = postgres_dir(base / "backups")
    segment = server_segment(base)
    result = as_server([*command, "wal-push", str(segment)], env={"BACKUP_DIR": str(backups)})
    assert result.returncode == 0, result.stderr
    assert_documented_modes(backups / "wal")


def test_wal_push_still_refuses_where_it_cannot_create_the_archive(base: Path, command: list[str]) -> None:
    segment = server_segment(base)
    root_owned = base / "root-owned"
    root_owned.mkdir(mode=0o711)  # the postgres user can pass through, not write
    os.chmod(root_owned, 0o711)
    for archive_dir in (root_owned / "wal", base / "not-there" / "wal"):  # no parent: nothing is invented
        result = as_server([*command, "wal-push", "--archive-dir", str(archive_dir), str(segment)])
        assert result.returncode == 1, result.stderr
        assert f"the WAL archive directory {archive_dir} {CANNOT_CREATE}" in result.stderr
        assert not archive_dir.exists()
    env_form = as_server([*command, "wal-push", str(segment)], env={"BACKUP_DIR": str(root_owned)})
    assert env_form.returncode == 1
    assert CANNOT_CREATE in env_form.stderr


@pytest.mark.slow
def test_check_accepts_a_working_archive_command_in_another_form(base: Path, command: list[str]) -> None:
    """``BACKUP_DIR=... backup-tasks wal-push %p`` archives fine: a warning naming the canonical line, not a failure."""
    backups = base / "backups"  # not there yet: check creates it and its archive
    push = f"BACKUP_DIR={shlex.quote(str(backups))} {shlex.join(command)} wal-push %p"
    with ThrowawayCluster(settings={"wal_level": "replica", "archive_mode": "on", "archive_timeout": "0",
                                    "archive_command": shlex.quote(push)}) as cluster:
        settings = Settings(database_url=cluster.url(), backup_dir=str(backups), broker_url="memory://",
                            lock_url=None)
        result = run_cli("check", "--json", "--timeout", "60", env=cli_env(settings))
    report = json.loads(result.stdout)
    assert report["arrived"] is True, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["problems"] == []
    canonical = next(line for line in report["postgresql_conf"] if line.startswith("archive_command"))
    assert any(canonical in warning and push in warning for warning in report["warnings"]), report["warnings"]
    assert any("created the WAL archive directory" in note for note in report["notes"]), report["notes"]
    assert not any("the the" in note for note in report["notes"]), report["notes"]


@pytest.mark.slow
def test_check_names_the_command_form_when_the_segment_does_not_arrive(base: Path) -> None:
    backups = base / "backups"
    with ThrowawayCluster(settings={"wal_level": "replica", "archive_mode": "on", "archive_timeout": "0",
                                    "archive_command": "false"}) as cluster:
        settings = Settings(database_url=cluster.url(), backup_dir=str(backups), broker_url="memory://",
                            lock_url=None)
        result = run_cli("check", "--json", "--timeout", "3", env=cli_env(settings))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    problems = " | ".join(report["problems"])
    assert "did not arrive" in problems and "archive_command does not push to" in problems, problems
    canonical = next(line for line in report["postgresql_conf"] if line.startswith("archive_command"))
    assert canonical in problems
