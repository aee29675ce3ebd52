"""``wal-push`` and ``wal-fetch`` exactly as PostgreSQL runs them (archive_command, restore_command).

PostgreSQL starts one per 16 MiB segment, so these are served with nothing but the archive module:
no argparse, settings, Celery, Redis, psycopg or Sentry (boto3 only when the copy is a bucket, pyrage
only when the archive is encrypted). Forms: ``wal-push --archive-dir DIR [--copy-to URL]
[--encrypt-to KEYS] PATH`` and ``wal-fetch --archive-dir DIR [--copy-to URL] [--identity-file FILE]
NAME PATH``, and ``wal-fetch --archive-url URL ... NAME PATH`` (a bucket alone, with read-ahead:
``wal.prefetch``); anything else goes to the full CLI. Every acknowledged segment is recorded in the
archive's state file (``wal.state``: the newest segment per location, which the exporter reads).

Exit codes: 0 ok, 1 failed; wal-fetch exits 1 for "not in the archive" (the normal end of recovery)
and ``RECOVERY_FATAL`` (200) when the archive is damaged or unreadable, which PostgreSQL treats as
fatal (any status above 125) instead of quietly ending recovery early.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from backup_tasks.wal.archive import PushResult, WalArchive

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
        try:
            push_and_record(archive, Path(positional[0]))  # with a copy: pushes the following .ready files ahead
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


def push_and_record(archive: WalArchive, source: Path, *, level: int | None = None) -> PushResult:
    """``wal-push`` of ``source`` (push-ahead with a copy), then the archive's state file (``wal.state``) updated.

    The state records a segment once it is acknowledged: stored here and in the copy. When the push
    fails after storing it here (the copy refused it), the local archive's entry still moves and the
    copy's stays behind, which is how the exporter sees a lagging copy. Every ``wal-push`` path is to
    call this (the fast path above, and the full CLI's ``cmd_wal_push``), so the state misses no segment.
    """
    from backup_tasks.errors import BackupError
    from backup_tasks.wal.archive import DEFAULT_LEVEL
    from backup_tasks.wal.names import SEGMENT_RE
    from backup_tasks.wal.pushahead import copy_url, push

    copy_where = copy_url(archive) if archive.copy_to else None
    recorded = bool(SEGMENT_RE.match(source.name))  # history, .partial and .backup files are not "newest WAL"
    try:
        result = push(archive, source, level=DEFAULT_LEVEL if level is None else level)
    except BackupError:
        if recorded and archive.copy_to:  # stored here before the copy refused it?
            _record_state(archive, source.name, copy_where, copy_stored=False)
        raise
    if recorded:
        _record_state(archive, source.name, copy_where, copy_stored=True)
    return result


def _record_state(archive: WalArchive, name: str, copy_where: str | None, *, copy_stored: bool) -> None:
    from backup_tasks.errors import WalMissing
    from backup_tasks.wal import state

    try:
        completed_at = archive.trailer(name).completed_at
    except WalMissing:
        return  # not stored here either: nothing to record
    except Exception as exc:  # the state is advisory: never the reason a push fails
        state.log.warning("backup-tasks wal-push: could not read back the trailer of %s for the state file: %s",
                          name, exc)
        return
    state.record(archive.root, name, completed_at, copy_where=copy_where, copy_stored=copy_stored)
