"""A compose deployment from empty volumes archives its first segment without any manual step.

There is no Docker engine here, so the postgres service is played as far as this machine allows: its
``-c`` options read from docker-compose.yml, a fresh empty directory for the ``backups`` volume with
the ownership and mode the Dockerfile gives ``/backups`` (a new named volume copies them from the
image), and its archive_command as written, with ``/backups`` moved to that directory and
``backup-tasks`` to a command the postgres OS user can run here. Nobody runs ``backup-tasks check``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backup_tasks.postgres.cluster import SERVER_USER, ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import server_command
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import DIR_MODE, FILE_MODE
from tests.support.compose import COMPOSE, DOCKERFILE, command, environment, mounts, service
from tests.support.pitr import reachable_dir, wait_archived

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own the volume as the postgres user")


@pytest.fixture
def base() -> Iterator[Path]:
    path = reachable_dir("bt-test-compose-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def image_directory(path: str) -> tuple[str, int]:
    """Owner and mode the Dockerfile gives ``path`` (what a new named volume mounted there starts with)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    owner = re.search(rf"chown (\S+?)(?::\S+)? (?:\S+ )*?{re.escape(path)}(?:\s|$)", text)
    mode = re.search(rf"chmod ([0-7]{{3,4}}) (?:\S+ )*?{re.escape(path)}(?:\s|$)", text)
    assert owner and mode, f"the Dockerfile must create {path} with an owner and a mode"
    return owner[1], int(mode[1], 8)


def moved(argv: list[str], mount: str, volume: Path, tool: list[str]) -> list[str]:
    """``argv`` with ``backup-tasks`` replaced by ``tool`` and paths under ``mount`` moved to ``volume``."""
    assert Path(argv[0]).name == "backup-tasks", argv
    return [*tool, *(str(volume) + arg[len(mount):] if arg == mount or arg.startswith(mount + "/") else arg
                     for arg in argv[1:])]


def test_the_backups_volume_belongs_to_the_user_that_runs_wal_push() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    owner, mode = image_directory("/backups")
    assert owner == SERVER_USER, "archive_command runs as postgres: it must be able to create /backups/wal"
    assert mode & 0o700 == 0o700
    for name in ("worker", "beat", "flower"):
        assert service(compose, name)["user"] == owner  # the worker reads and prunes what postgres wrote


@pytest.mark.slow
def test_a_fresh_deployment_archives_its_first_segment_without_check(base: Path) -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    postgres = service(compose, "postgres")
    argv = command(postgres)
    assert argv[0] == "postgres" and all(flag == "-c" for flag in argv[1::2])
    options = dict(arg.split("=", 1) for arg in argv[2::2])
    mount = next(target for target, volume in mounts(postgres).items() if volume == "backups")

    # The empty named volume, as the image's /backups makes it.
    owner, mode = image_directory(mount)
    volume = base / "backups-volume"
    volume.mkdir()
    shutil.chown(volume, owner, owner)
    os.chmod(volume, mode)
    assert not list(volume.iterdir())

    push = moved(shlex.split(options["archive_command"]), mount, volume, server_command(base / "tool"))
    options["archive_command"] = shlex.join(push)
    with ThrowawayCluster(settings={k: shlex.quote(v) for k, v in options.items()}) as cluster:
        with connect(cluster.conninfo()) as conn:
            conn.execute("CREATE TABLE first_trade (id int)")
            conn.execute("INSERT INTO first_trade VALUES (1)")
            segment = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
        # Where the worker (BACKUP_DIR on the same volume) looks for WAL.
        worker_archive = Settings.from_env(environment(service(compose, "worker"))).wal_archive
        archive = WalArchive.in_directory(volume / worker_archive.relative_to(mount))
        wait_archived(archive, segment, timeout=30)
        with connect(cluster.conninfo()) as conn:
            failed = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]
    assert failed == 0, "the first attempt must succeed: no failure, no retry, no WAL piling up"
    assert stat.S_IMODE(archive.root.stat().st_mode) == DIR_MODE
    assert stat.S_IMODE(archive.path_for(segment).parent.stat().st_mode) == DIR_MODE
    assert stat.S_IMODE(archive.path_for(segment).stat().st_mode) == FILE_MODE
    assert archive.root.stat().st_uid == volume.stat().st_uid
    assert sum(len(c) for c in archive.verified_chunks(segment, hashlib.sha256())) == 16 << 20
