"""Point-in-time recovery for the tests (a pytest plugin: ``scenario`` and ``restored_dirs`` by name).

``PitrEnv`` is a directory the postgres OS user can reach, holding a backup directory and its WAL
archive, and makes throwaway clusters that archive into it with ``backup-tasks wal-push``.
``scenario`` (module scope) is a snapshot of such a cluster followed by rows, a noted time and a restore
point; a module may override it with a scenario of its own (``restored_dirs`` then follows that one).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.conninfo import ConnInfo
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import SERVER_USER, ThrowawayCluster, as_server_user
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate
from backup_tasks.postgres.servercmd import (
    archive_command,
    installed_command,
    portable_tool,
    runnable_by_server,
    server_command,
)
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.restore_points import create_restore_point
from backup_tasks.wal.setup import prepare_archive
from tests.support.paths import PYTHON, ROOT

# --- a postgres-reachable backup directory, its WAL archive and the CLI --------------------------------

def reachable_dir(prefix: str) -> Path:
    """A fresh directory the postgres OS user can enter (pytest's tmp_path under /tmp/pytest-of-root is not)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o711)
    return base


@pytest.fixture(scope="session")
def server_user_cli() -> Iterator[list[str]]:
    """``backup-tasks`` with all its runtime dependencies, runnable by the postgres OS user from any checkout.

    This installation when that user can run it; else (a checkout under a 0700 directory, as /root or a
    ``mktemp -d``) a portable copy with every runtime dependency, in a directory that user can enter.
    """
    command = installed_command()
    if runnable_by_server(command):
        yield command
        return
    base = reachable_dir("bt-test-cli-")
    try:
        yield portable_tool(base / "tool", ("backup-tasks",))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "CELERY_", "SENTRY_", "WAL_"))}
    env.pop("DATABASE_URL", None)
    env.update({"BACKUP_DIR": settings.backup_dir, "CELERY_BROKER_URL": "memory://"})
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    if settings.wal_archive_dir:
        env["WAL_ARCHIVE_DIR"] = settings.wal_archive_dir
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "backup_tasks.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout, check=False)


def wait_archived(archive: WalArchive, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not archive.exists(name):
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} was not archived into {archive.root} within {timeout}s")
        time.sleep(0.1)


def switch_and_wait(conninfo: object, archive: WalArchive) -> str:
    """Commit something, force a segment switch and wait until that segment is in the archive."""
    with connect(conninfo) as conn:  # type: ignore[arg-type]
        conn.execute("SELECT txid_current()")
        name = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
    wait_archived(archive, name)
    return name


class PitrEnv:
    """A postgres-reachable base directory with a backup directory, its WAL archive and the wal command."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.backup_dir = base / "backups"
        self.settings = Settings(backup_dir=str(self.backup_dir), broker_url="memory://", lock_url=None)
        self.archive, _notes = prepare_archive(self.settings)
        self.command = server_command(base / "tool")  # this install, or a portable copy postgres can run

    def for_cluster(self, cluster: ThrowawayCluster, dbname: str = "postgres", **overrides: object) -> Settings:
        values: dict[str, object] = {"database_url": cluster.url(dbname), "backup_dir": str(self.backup_dir),
                                     "broker_url": "memory://", "lock_url": None}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def archiving_cluster(self, archive_dir: Path | None = None) -> ThrowawayCluster:
        """A throwaway source whose archive_command is ``backup-tasks wal-push`` (run as postgres)."""
        command = archive_command(self.command, archive_dir or self.archive.root)
        return ThrowawayCluster(settings={"wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on",
                                          "archive_command": shlex.quote(command), "archive_timeout": "0"})


@contextmanager
def trading_cluster(prefix: str, *, signals: int = 400) -> Iterator[tuple[PitrEnv, ThrowawayCluster]]:
    """A throwaway cluster archiving through wal-push with a small trading database ``aitrapp``; removed after."""
    env = PitrEnv(reachable_dir(prefix))
    try:
        with env.archiving_cluster() as cluster:
            with connect(cluster.conninfo()) as conn:
                conn.execute("CREATE DATABASE aitrapp")
            generate(cluster.conninfo("aitrapp"), signals=signals)
            yield env, cluster
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


# --- the scenario: snapshot, rows, a noted time, a restore point ---------------------------------------

@dataclass
class Scenario:
    env: PitrEnv
    source: ThrowawayCluster
    settings: Settings
    snapshot: catalog.Manifest
    noted_time: str  # as the server printed now()
    point_name: str


def insert(conninfo: ConnInfo, first: int, last: int, phase: str) -> None:
    with connect(conninfo) as conn:
        conn.execute("INSERT INTO marks SELECT g, %s FROM generate_series(%s::int, %s::int) g", (phase, first, last))


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    """Snapshot; rows 1-100; note the time; rows 101-150; restore point; rows 151-170; switch WAL."""
    env = PitrEnv(reachable_dir("bt-test-pitr-"))
    try:
        with env.archiving_cluster() as source:
            settings = env.for_cluster(source)
            conninfo = source.conninfo()
            with connect(conninfo) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
            snapshot = take_snapshot(settings)
            insert(conninfo, 1, 100, "first")
            with connect(conninfo) as conn:
                noted = str(conn.execute("SELECT now()::text").fetchone()[0])  # e.g. 2026-11-27 15:55:47.625773+00
            insert(conninfo, 101, 150, "second")
            create_restore_point(settings, "after-second", trading_day="2026-11-27")
            insert(conninfo, 151, 170, "third")
            switch_and_wait(conninfo, env.archive)
            yield Scenario(env, source, settings, snapshot, noted, "after-second")
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


@pytest.fixture
def restored_dirs(scenario: Scenario) -> Iterator[list[Path]]:
    """Data directories restored by a test: their servers are stopped and the directories removed after it."""
    dirs: list[Path] = []
    yield dirs
    stop_restored(dirs)
    for data_dir in dirs:
        shutil.rmtree(data_dir, ignore_errors=True)


def stop_restored(data_dirs: Iterable[Path]) -> None:
    """Stop (immediately) the servers a test started on restored data directories, where one still runs."""
    for data_dir in data_dirs:
        if (data_dir / "postmaster.pid").exists():
            subprocess.run([*as_server_user(), "/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(data_dir), "-m",
                            "immediate", "stop"], capture_output=True, check=False, cwd="/")


def marks(port: int) -> list[int]:
    with psycopg.connect(host="127.0.0.1", port=port, user=SERVER_USER, dbname="postgres") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")]
