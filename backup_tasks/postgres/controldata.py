"""What ``pg_controldata`` and ``postmaster.pid`` say about a data directory (no connection needed)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path


def controldata_state(bin_dir: Path, data_dir: Path) -> str:
    result = subprocess.run([str(bin_dir / "pg_controldata"), str(data_dir)], capture_output=True, text=True,
                            check=False, env={**os.environ, "LC_ALL": "C"})
    match = re.search(r"Database cluster state:\s*(.+)", result.stdout)
    return match[1].strip() if match else "unknown"


def postmaster_running(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


#: Hot standby refuses to run with lower limits than the source had; pg_controldata names them so.
CONTROL_LIMITS = {"max_connections setting": "max_connections", "max_worker_processes setting":
                  "max_worker_processes", "max_wal_senders setting": "max_wal_senders",
                  "max_prepared_xacts setting": "max_prepared_transactions",
                  "max_locks_per_xact setting": "max_locks_per_transaction"}


def control_limits(bin_dir: Path, data_dir: Path) -> dict[str, str]:
    out = subprocess.run([str(bin_dir / "pg_controldata"), str(data_dir)], capture_output=True, text=True,
                         check=False, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
    limits = {}
    for label, setting in CONTROL_LIMITS.items():
        match = re.search(rf"{label}:\s*(\d+)", out)
        if match:
            limits[setting] = match[1]
    return limits
