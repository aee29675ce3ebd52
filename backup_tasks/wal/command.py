"""``wal-push`` and ``wal-fetch`` exactly as PostgreSQL runs them (archive_command, restore_command).

PostgreSQL starts one per 16 MiB segment, so these are served with nothing but the archive module:
no argparse, settings, Celery, Redis, psycopg or Sentry (boto3 only when the copy is a bucket, pyrage
only when the archive is encrypted). Forms: ``wal-push --archive-dir DIR [--copy-to URL]
[--encrypt-to KEYS] PATH`` and ``wal-fetch --archive-dir DIR [--copy-to URL] [--identity-file FILE]
NAME PATH``, and ``wal-fetch --archive-url URL ... NAME PATH`` (a bucket alone, with read-ahead:
``wal.prefetch``); anything else goes to the full CLI.

Exit codes: 0 ok, 1 failed; wal-fetch exits 1 for "not in the archive" (the normal end of recovery)
and ``RECOVERY_FATAL`` (200) when the archive is damaged or unreadable, which PostgreSQL treats as
fatal (any status above 125) instead of quietly ending recovery early.
"""

from __future__ import annotations

import sys

RECOVERY_FATAL = 200
SERVER_COMMANDS = ("wal-push", "wal-fetch")
FAST_OPTIONS = ("--copy-to", "--encrypt-to", "--identity-file")


def server_command_fast(argv: list[str]) -> int | None:
    """Run wal-push / wal-fetch given exactly as PostgreSQL runs them; None for anything else."""
    if len(argv) >= 2 and argv[0] == "wal-fetch" and argv[1] == "--archive-url":
        from backup_tasks.wal.prefetch import main as fetch_from_bucket  # restoring from the bucket alone

        return fetch_from_bucket(argv[1:])
    if len(argv) < 4 or argv[0] not in SERVER_COMMANDS or argv[1] != "--archive-dir":
        return None
    positional = argv[3:]
    # BACKUP_COPY_TO, BACKUP_ENCRYPT_RECIPIENT and BACKUP_DECRYPT_IDENTITY_FILE, as archive_command and
    # restore_command pass them (the server's environment has none of the worker's settings).
    options: dict[str, str] = {}
    while len(positional) >= 2 and positional[0] in FAST_OPTIONS and positional[0] not in options:
        options[positional[0]] = positional[1]
        positional = positional[2:]
    if any(a.startswith("-") for a in positional) or len(positional) != (1 if argv[0] == "wal-push" else 2):
        return None
    from pathlib import Path

    from backup_tasks.errors import BackupError, WalMissing
    from backup_tasks.wal.archive import WalArchive

    recipients: tuple[str, ...] = ()
    try:
        if options.get("--encrypt-to"):
            from backup_tasks.streams.crypto import parse_recipients

            recipients = parse_recipients(options["--encrypt-to"], setting="--encrypt-to")
    except BackupError as exc:
        print(f"backup-tasks {argv[0]}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    archive = WalArchive(Path(argv[2]).absolute(), options.get("--copy-to"), recipients=recipients,
                         identity_file=options.get("--identity-file"))
    if argv[0] == "wal-push":
        from backup_tasks.wal.pushahead import push

        try:
            push(archive, Path(positional[0]))  # with a copy: pushes the following .ready files ahead
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
