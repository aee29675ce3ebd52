"""``wal-push`` and ``wal-fetch``: their command line, defined and checked here once, and how they run.

PostgreSQL starts one per 16 MiB segment (archive_command, restore_command), so the forms it runs
are served from here with nothing but the archive and the storage layer: no argparse, settings,
Celery, Redis, psycopg or Sentry (boto3 only when a bucket is used, pyrage only when the archive is
encrypted). Forms::

    wal-push  --archive-dir DIR [--copy-to URL] [--encrypt-to KEYS] [--level N] [--copy-timeout SECONDS]
              [--drop-after BYTES] PATH
    wal-fetch --archive-dir DIR [--copy-to URL] [--identity-file FILE] NAME PATH
    wal-fetch --archive-url URL [--identity-file FILE] [--prefetch K] [--as-of ISO-TIME] NAME PATH

(the last: a bucket alone, with read-ahead, ``wal.prefetch``; ``restore_command_for`` writes it).
``PUSH_OPTIONS`` and ``FETCH_OPTIONS`` are every option of the two commands; ``parse`` reads the
forms above (the command, ``--option VALUE`` pairs, each at most once, then the arguments). Any other
command line (no ``--archive-dir``/``--archive-url``: settings from the environment; ``--json``;
a mistake) goes to the full CLI, which registers the same options with argparse (``cli.pitr``) and
asks the same ``FetchRequest`` whether a wal-fetch makes sense: one set of rules for both.

wal-push exits 0 once the file is durable in the archive: the copy gets ``--copy-timeout`` seconds
(default 10), else the file is queued for it (``wal.backlog``) and shipped later (``wal.ship``); a
copy that hangs holds no process (``storage.copies.bounded``, and ``_push`` exits whatever threads
are left). ``--drop-after``: see ``wal.dropped`` (off by default).

Every acknowledged segment is recorded in the archive's state file (``wal.state``: the newest segment
per location, which the exporter reads). Exit codes: 0 ok, 1 failed; wal-fetch exits 1 for "not in
the archive" (the normal end of recovery) and ``RECOVERY_FATAL`` (200) when the archive is damaged
or unreadable, which PostgreSQL treats as fatal (any status above 125) instead of quietly ending
recovery early.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from datetime import datetime

    from backup_tasks.wal.archive import PushResult, WalArchive

RECOVERY_FATAL = 200
#: Segments ``wal-fetch --archive-url`` downloads ahead by default, and at most.
DEFAULT_DEPTH = 8
MAX_DEPTH = 64


# NamedTuples, not dataclasses: cheaper to define, and this module is loaded once per WAL segment.

class Option(NamedTuple):
    """One option of wal-push or wal-fetch: ``--flag VALUE``."""

    flag: str
    help: str
    metavar: str | None = None
    integer: bool = False
    default: int | None = None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


ARCHIVE_DIR = Option("--archive-dir", "the WAL archive (default: WAL_ARCHIVE_DIR, else BACKUP_DIR/wal)")
PUSH_OPTIONS = (
    ARCHIVE_DIR,
    Option("--copy-to", "also write it to COPY_TO/wal (default without --archive-dir: BACKUP_COPY_TO)"),
    Option("--encrypt-to", "age public keys, comma-separated (default without --archive-dir: "
                           "BACKUP_ENCRYPT_RECIPIENT)"),
    Option("--level", "zstd level (default 1)", integer=True, default=1),
    Option("--copy-timeout", "seconds the copy is given before the file is queued for it and acknowledged all the "
                             "same (default without --archive-dir: BACKUP_COPY_TIMEOUT_SECONDS, else 10)",
           metavar="SECONDS", integer=True),
    Option("--drop-after", "when neither the archive nor the copy can take the file and pg_wal holds more than BYTES "
                           "waiting to be archived, acknowledge it WITHOUT storing it, loudly, so the server's disk "
                           "never fills (default without --archive-dir: BACKUP_WAL_DROP_AFTER_BYTES, else never)",
           metavar="BYTES", integer=True),
)
FETCH_OPTIONS = (
    ARCHIVE_DIR,
    Option("--copy-to", "fall back to COPY_TO/wal when missing or damaged (default without --archive-dir: "
                        "BACKUP_COPY_TO)"),
    Option("--identity-file", "age identity file for an encrypted archive (default without --archive-dir: "
                              "BACKUP_DECRYPT_IDENTITY_FILE)"),
    Option("--archive-url", "read the archive from this location alone (s3://bucket/prefix/wal), downloading the "
                            "next segments ahead: disaster recovery"),
    Option("--prefetch", f"with --archive-url: segments to download ahead (default {DEFAULT_DEPTH}, 0 = none)",
           integer=True, default=DEFAULT_DEPTH),
    Option("--as-of", "with --archive-url: read the bucket as it was at this time (a versioned bucket); no zone "
                      "means BACKUP_TIMEZONE", metavar="TIME"),
)
OPTIONS = {"wal-push": PUSH_OPTIONS, "wal-fetch": FETCH_OPTIONS}
#: The positional arguments of each command: (name, help).
ARGUMENTS = {"wal-push": (("path", "the file to archive (%p)"),),
             "wal-fetch": (("name", "the WAL file name (%f)"), ("destination", "where to write it (%p)"))}


class Call(NamedTuple):
    """A wal-push or wal-fetch command line in the form PostgreSQL runs it."""

    command: str
    options: dict[str, str]  # by ``Option.dest``
    arguments: list[str]


def parse(argv: list[str]) -> Call | None:
    """``argv`` as PostgreSQL runs it (an archive location given): the call; None for any other command line."""
    if not argv or argv[0] not in OPTIONS:
        return None
    table = {option.flag: option for option in OPTIONS[argv[0]]}
    options: dict[str, str] = {}
    rest = argv[1:]
    while len(rest) >= 2 and rest[0] in table and table[rest[0]].dest not in options:
        option = table[rest[0]]
        if option.integer and not rest[1].isdigit():
            return None
        options[option.dest] = rest[1]
        rest = rest[2:]
    if len(rest) != len(ARGUMENTS[argv[0]]) or any(a.startswith("-") for a in rest):
        return None
    if not (options.get("archive_dir") or options.get("archive_url")):
        return None
    return Call(argv[0], options, rest)


class FetchRequest(NamedTuple):
    """What a wal-fetch asks for, however it was given (``parse``, or the full CLI with its settings)."""

    name: str
    destination: Path
    archive_dir: Path | None = None
    archive_url: str | None = None
    copy_to: str | None = None
    identity_file: str | None = None
    prefetch: int = DEFAULT_DEPTH
    as_of: datetime | None = None

    @classmethod
    def of(cls, call: Call) -> FetchRequest | None:
        """The request of a parsed call; None when ``--as-of`` is not an ISO 8601 time with its offset."""
        from datetime import datetime

        as_of = None
        if "as_of" in call.options:
            try:
                as_of = datetime.fromisoformat(call.options["as_of"])
            except ValueError:
                return None
            if as_of.tzinfo is None:
                return None
        archive_dir = call.options.get("archive_dir")
        return cls(call.arguments[0], Path(call.arguments[1]),
                   archive_dir=Path(archive_dir).absolute() if archive_dir else None,
                   archive_url=call.options.get("archive_url"), copy_to=call.options.get("copy_to"),
                   identity_file=call.options.get("identity_file"),
                   prefetch=int(call.options.get("prefetch", DEFAULT_DEPTH)), as_of=as_of)

    def problem(self) -> str | None:
        """Why this request makes no sense (a usage error), or None."""
        if self.archive_url and (self.archive_dir or self.copy_to):
            return "--archive-url reads the bucket alone: give it without --archive-dir or --copy-to"
        if self.as_of is not None and not self.archive_url:
            return ("--as-of reads a bucket as it was: give it with --archive-url (a local archive keeps no earlier "
                    "versions)")
        if self.prefetch < 0:
            return "--prefetch must be 0 or more"
        return None


def fetch(request: FetchRequest) -> int:
    """wal-fetch: ``request.name`` restored to ``request.destination``; its size.

    Raises ``WalMissing`` when it is provably not archived; anything else is fatal for recovery.
    """
    if request.archive_url:  # the bucket alone (disaster recovery): read-ahead into a spool
        from backup_tasks.wal.prefetch import fetch_with_prefetch

        return fetch_with_prefetch(request.archive_url, request.name, request.destination,
                                   identity_file=request.identity_file, as_of=request.as_of,
                                   depth=min(request.prefetch, MAX_DEPTH))
    from backup_tasks.errors import ConfigError
    from backup_tasks.wal.archive import WalArchive

    if request.archive_dir is None:
        raise ConfigError("wal-fetch needs --archive-dir or --archive-url")
    archive = WalArchive.in_directory(request.archive_dir, request.copy_to, identity_file=request.identity_file)
    return archive.fetch(request.name, request.destination)


def restore_command_for(command: list[str], url: str, identity_file: object = None, depth: int = DEFAULT_DEPTH,
                        as_of: datetime | None = None) -> str:
    """restore_command reading ``url`` (a bucket's ``wal/``, as of ``as_of``) with read-ahead, quoted for the
    server's shell: the third form above."""
    import shlex
    from datetime import UTC

    args = [*map(shlex.quote, command), "wal-fetch", "--archive-url", shlex.quote(url)]
    if identity_file:
        args += ["--identity-file", shlex.quote(str(identity_file))]
    if as_of is not None:
        args += ["--as-of", as_of.astimezone(UTC).isoformat()]
    if depth != DEFAULT_DEPTH:
        args += ["--prefetch", str(depth)]
    return " ".join([*args, "%f", "%p"])


def server_command_fast(argv: list[str]) -> int | None:
    """Run wal-push / wal-fetch given exactly as PostgreSQL runs them; None for anything else."""
    call = parse(argv)
    if call is None:
        return None
    if call.command == "wal-push":
        return _push(call)
    request = FetchRequest.of(call)
    if request is None or request.problem() is not None:
        return None  # the full CLI says what is wrong
    from backup_tasks.errors import WalMissing

    try:
        fetch(request)
    except WalMissing as exc:
        print(f"backup-tasks wal-fetch: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a gap, damage, an unreadable archive, a bug: anything but "not archived"
        print(f"backup-tasks wal-fetch: FATAL: {exc}", file=sys.stderr)
        return RECOVERY_FATAL
    return 0


def _push(call: Call) -> int | None:
    if "archive_dir" not in call.options:
        return None
    from backup_tasks.errors import BackupError
    from backup_tasks.wal.archive import WalArchive

    # BACKUP_COPY_TO and BACKUP_ENCRYPT_RECIPIENT, as archive_command passes them (the server's environment
    # has none of the worker's settings).
    try:
        recipients: tuple[str, ...] = ()
        if call.options.get("encrypt_to"):
            from backup_tasks.streams.crypto import parse_recipients

            recipients = parse_recipients(call.options["encrypt_to"], setting="--encrypt-to")
        archive = WalArchive.in_directory(Path(call.options["archive_dir"]).absolute(), call.options.get("copy_to"),
                                          recipients=recipients)
        drop_after = call.options.get("drop_after")
        copy_timeout = call.options.get("copy_timeout")
        push_and_record(archive, Path(call.arguments[0]), level=int(call.options.get("level", 1)),
                        copy_within=float(copy_timeout) if copy_timeout is not None else None,
                        drop_after=int(drop_after) if drop_after is not None else None, detach=True)
    except BackupError as exc:
        print(f"backup-tasks wal-push: error: {exc}", file=sys.stderr)
        return exit_leaving_copies(exc.exit_code)
    return exit_leaving_copies(0)


def exit_leaving_copies(code: int) -> int:
    """``code``, ending the process at once when a put into the copy was abandoned (still running in its daemon
    thread): the server waits for this process, and nothing of a hung endpoint may hold it (not even the
    interpreter's shutdown meeting a lock that thread holds)."""
    import threading

    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def push_and_record(archive: WalArchive, source: Path, *, level: int | None = None,
                    copy_within: float | None = None, drop_after: int | None = None,
                    detach: bool = False) -> PushResult:
    """``wal-push`` of ``source`` (push-ahead with a copy), then the archive's state file (``wal.state``) updated.

    The state records a segment once it is acknowledged: stored here, and in the copy when the copy
    took it with nothing queued before it. While the copy lacks files (``wal.backlog``), the local
    archive's entry moves and the copy's stays behind until the shipper catches up, which is how the
    exporter sees a lagging copy. Every ``wal-push`` path is to call this (the fast path above, and
    the full CLI's ``cmd_wal_push``), so the state misses no segment. ``copy_within``: seconds the copy
    is given (None: ``backlog.COPY_TIMEOUT``); ``drop_after``: ``wal.dropped``; ``detach``: the files ahead
    are stored by a forked pusher (``wal.pushahead``), for a caller that is a process of its own.
    """
    from backup_tasks.errors import BackupError, StorageError, WalConflict
    from backup_tasks.wal.backlog import COPY_TIMEOUT
    from backup_tasks.wal.names import SEGMENT_RE
    from backup_tasks.wal.objects import DEFAULT_LEVEL
    from backup_tasks.wal.pushahead import push

    copy_where = archive.copy.location if archive.copy is not None else None
    recorded = bool(SEGMENT_RE.match(source.name))  # history, .partial and .backup files are not "newest WAL"
    try:
        result = push(archive, source, level=DEFAULT_LEVEL if level is None else level,
                      copy_within=COPY_TIMEOUT if copy_within is None else copy_within, detach=detach)
    except BackupError as exc:
        if drop_after is not None and isinstance(exc, StorageError) and not isinstance(exc, WalConflict):
            dropped = _drop(archive, source, exc, drop_after)  # neither the archive nor the copy took it
            if dropped is not None:
                return dropped
        if recorded and copy_where:  # stored here before it failed?
            _record_state(archive, source.name, copy_where, copy_stored=False)
        raise
    if result.status != "copy-only" and archive.root is not None:
        from backup_tasks.wal.backlog import Backlog
        from backup_tasks.wal.dropped import adopt

        adopt(archive.root, source.parent)  # records of dropped WAL the archive could not take before
        if recorded:
            in_copy = result.copy == "stored" and not Backlog(archive.root).pending()
            _record_state(archive, source.name, copy_where, copy_stored=in_copy)
    return result


def _drop(archive: WalArchive, source: Path, failure: Exception, drop_after: int) -> PushResult | None:
    """``source`` acknowledged without being stored when pg_wal holds more than ``drop_after`` (``wal.dropped``)."""
    from backup_tasks.wal.archive import PushResult
    from backup_tasks.wal.dropped import drop_if_over
    from backup_tasks.wal.layout import object_key

    if archive.root is not None and archive.path_for(source.name).is_file():
        return None  # stored here after all (it failed later, queueing it for the copy): not dropped, not acked
    dropped = drop_if_over(archive.root, source, failure, drop_after)
    if dropped is None:
        return None
    return PushResult(source.name, object_key(source.name), "dropped", dropped.size, 0)


def _record_state(archive: WalArchive, name: str, copy_where: str | None, *, copy_stored: bool) -> None:
    from backup_tasks.errors import WalMissing
    from backup_tasks.wal import state

    if archive.root is None:
        return  # the state file lives beside a local archive
    try:
        completed_at = archive.trailer(name, primary_only=True).completed_at
    except WalMissing:
        return  # not stored here either: nothing to record
    except Exception as exc:  # the state is advisory: never the reason a push fails
        state.log.warning("backup-tasks wal-push: could not read back the trailer of %s for the state file: %s",
                          name, exc)
        return
    state.record(archive.root, name, completed_at, copy_where=copy_where, copy_stored=copy_stored)
