"""The lightest way into ``backup-tasks``: PostgreSQL's archive_command and restore_command.

PostgreSQL starts ``backup-tasks wal-push %p`` once per 16 MiB segment, so these two commands, in
the form the server runs them (``wal-push --archive-dir DIR PATH``, ``wal-fetch --archive-dir DIR
NAME PATH``), are served here with nothing but the archive module: no argparse, logging, settings,
Celery, Redis, psycopg or Sentry. Every other command line goes to the full CLI (``cli.main``).

Exit codes are the CLI's (0 ok, 1 failed); wal-fetch exits 1 for "not in the archive" (the normal
end of recovery) and 200 when the archive is damaged or unreadable, which PostgreSQL treats as fatal
(any status above 125) instead of quietly ending recovery early.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

RECOVERY_FATAL = 200
SERVER_COMMANDS = ("wal-push", "wal-fetch")


def server_command_fast(argv: list[str]) -> int | None:
    """Run wal-push / wal-fetch given exactly as PostgreSQL runs them; None for anything else."""
    if len(argv) < 4 or argv[0] not in SERVER_COMMANDS or argv[1] != "--archive-dir":
        return None
    positional = argv[3:]
    if any(a.startswith("-") for a in positional) or len(positional) != (1 if argv[0] == "wal-push" else 2):
        return None
    from pathlib import Path

    from .errors import BackupError, WalMissing
    from .wal import WalArchive

    archive = WalArchive(Path(argv[2]).absolute())
    if argv[0] == "wal-push":
        try:
            archive.push(Path(positional[0]))
        except BackupError as exc:
            print(f"backup-tasks wal-push: error: {exc}", file=sys.stderr)
            return exc.exit_code
        return 0
    try:
        archive.fetch(positional[0], Path(positional[1]))
    except WalMissing as exc:
        print(f"backup-tasks wal-fetch: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a gap, damage, an unreadable archive, a bug: anything but "not archived"
        print(f"backup-tasks wal-fetch: FATAL: {exc}", file=sys.stderr)
        return RECOVERY_FATAL
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    fast = server_command_fast(args)
    if fast is not None:
        return fast
    from .cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
