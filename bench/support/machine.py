"""Facts about the machine and the PostgreSQL server a benchmark ran on, for its report."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import psycopg

from backup_tasks.postgres.tools import find_tool

#: Server settings that change what a dump or a restore costs.
SERVER_SETTINGS = ("shared_buffers", "fsync", "wal_level", "synchronous_commit", "max_wal_size",
                   "maintenance_work_mem", "work_mem", "max_parallel_maintenance_workers", "jit")


def _first_match(path: str, prefix: str) -> str | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def host_facts() -> dict[str, Any]:
    """CPU model and count, memory, kernel, Python."""
    mem_kib = _first_match("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _first_match("/proc/cpuinfo", "model name") or platform.processor(),
        "nproc": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / (1 << 20), 1) if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _version_line(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()[0].strip()


def server_facts(admin: psycopg.Connection) -> dict[str, Any]:
    """The server's version and settings, and the versions of the tools the daily cycle runs."""
    import zstandard

    settings = dict(admin.execute(
        "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name = ANY(%s)",
        (list(SERVER_SETTINGS),)).fetchall())
    return {
        "zstandard": zstandard.__version__,
        "postgresql_server": str(admin.execute("SHOW server_version").fetchone()[0]),
        "pg_dump": _version_line([str(find_tool("pg_dump").path), "--version"]),
        "gzip": _version_line(["gzip", "--version"]),
        "local_server_settings": settings,
    }
