"""The console script ``backup-tasks``: the WAL fast path first, everything else through the full CLI.

``wal-push``/``wal-fetch`` in the form PostgreSQL runs them are served by ``wal.command`` without
importing the CLI (no argparse, Celery, psycopg...); any other command line goes to ``cli.main``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from backup_tasks.wal.command import server_command_fast


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    fast = server_command_fast(args)
    if fast is not None:
        return fast
    from backup_tasks.cli.main import main as cli_main

    return cli_main(args)
