"""Running the project's commands from a benchmark: their environment, a free port, stopping a server."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from backup_tasks.postgres.cluster import as_server_user
from backup_tasks.postgres.tools import tool_for_data_dir

#: The project's settings (and libpq's) in the caller's environment: a benchmark states its own.
_SETTING_PREFIXES = ("BACKUP_", "WAL_", "CELERY_", "SENTRY_", "PG")
_SETTING_NAMES = ("DATABASE_URL", "VERIFY_DATABASE_URL", "RESTORE_DATABASE_URL")
#: Kept: where the PostgreSQL tools are is a fact of the machine, not of the benchmark.
_MACHINE_SETTINGS = ("PG_BIN_DIR",)


def cli_env(**settings: str) -> dict[str, str]:
    """This process's environment less the project's and libpq's settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items()
           if k in _MACHINE_SETTINGS or not (k.startswith(_SETTING_PREFIXES) or k in _SETTING_NAMES)}
    env.update(settings)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_server(data_dir: Path) -> None:
    """``pg_ctl stop -m immediate`` of a server a benchmark started in ``data_dir`` (as the postgres user)."""
    if (data_dir / "postmaster.pid").exists():
        pg_ctl = tool_for_data_dir("pg_ctl", data_dir).path
        subprocess.run([*as_server_user(), str(pg_ctl), "-D", str(data_dir), "-m", "immediate", "stop"],
                       capture_output=True, check=False, cwd="/")
